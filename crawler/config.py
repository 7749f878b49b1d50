"""Configuration: the shipped defaults, overridden key by key by one TOML file and the environment.

`config/default.toml` (installed as the package `crawler._defaults`) holds every key. An override
file may only name keys that exist there, with a value of the same type; the two free-form tables
are `http.connect_to` ("host:port" = "addr:port") and `budgets.<name>`. Any violation raises
`ConfigError` whose message is one line naming the file and the key.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import redact

ENV_DSN = "CRAWLER_DSN"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_HOSTPORT = re.compile(r"^\[?[A-Za-z0-9.*:_-]+\]?:\d{1,5}$")


# Keys earlier versions had, and why they are gone; an override file may still name them.
RETIRED = {
    "artifacts.index_sync_commits": "the checkout's index now moves with every commit",
    "artifacts.index_sync_interval_s": "the checkout's index now moves with every commit",
}


class ConfigError(Exception):
    """A configuration problem; str() is the one line shown to the operator."""


def load_defaults() -> dict[str, Any]:
    text = importlib.resources.files("crawler._defaults").joinpath("default.toml").read_text()
    return tomllib.loads(text)


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(v), type(v).__name__)


WORKERS_RULE = 'must be a whole number of at least 1, or "auto"'


def worker_count_ok(value: Any) -> bool:
    """run.workers and --workers: a whole number of at least 1, or "auto" (one per core)."""
    return value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def _same_type(default: Any, value: Any, key: str = "") -> bool:
    if key == "workers":  # a number, or "auto" (checked in _validate)
        return isinstance(value, (int, str))
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float) or (isinstance(default, int) and key.endswith("_s")):
        # Durations are numbers of seconds, whole or not (the contract writes `timeout_s = 60`).
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _merge(defaults: dict, override: dict, where: str, origin: str, free: bool = False) -> dict:
    merged = copy.deepcopy(defaults)
    for key, value in override.items():
        dotted = f"{where}.{key}" if where else key
        if dotted == "http.connect_to" or dotted == "budgets":
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: {dotted} must be a table")
            merged[key] = {**merged.get(key, {}), **value} if dotted == "budgets" else dict(value)
            if dotted == "budgets":
                for name, table in value.items():
                    base = defaults.get("budgets", {}).get(name, {})
                    if not isinstance(table, dict):
                        raise ConfigError(f"{origin}: budgets.{name} must be a table")
                    merged["budgets"][name] = {**base, **table}
            continue
        if dotted in RETIRED:
            continue  # a key an earlier version had: no longer used, and no reason to refuse a file
        if key not in defaults and not free:
            raise ConfigError(f"{origin}: unknown key {dotted}")
        if isinstance(defaults.get(key), dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: {dotted} must be a table, got {_type_name(value)}")
            merged[key] = _merge(defaults[key], value, dotted, origin)
        else:
            if key in defaults and not _same_type(defaults[key], value, key):
                kind = "a number" if key.endswith("_s") else _type_name(defaults[key])
                raise ConfigError(f"{origin}: {dotted} must be {kind}, got {value!r}")
            merged[key] = value
    return merged


@dataclass(frozen=True)
class BudgetSpec:
    name: str
    hosts: tuple[str, ...]
    max_inflight: int
    rate_per_s: float


@dataclass(frozen=True)
class Config:
    """The effective configuration: `raw` is the merged tree, sections are reached as dicts."""

    raw: dict[str, Any]
    origin: str
    origins: dict[str, str] = field(default_factory=dict)  # dotted key -> where its value came from (absent: default)

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.raw[section]

    @property
    def budgets(self) -> list[BudgetSpec]:
        out = []
        for name, t in self.raw["budgets"].items():
            out.append(BudgetSpec(name, tuple(h.lower() for h in t.get("hosts", [])),
                                  int(t["max_inflight"]), float(t["rate_per_s"])))
        return out

    def masked(self) -> dict[str, Any]:
        """The tree with secrets (passwords in DSNs and URLs) replaced, for logs and reports."""
        tree = copy.deepcopy(self.raw)
        tree["db"]["dsn"] = redact.dsn(tree["db"]["dsn"])
        if tree["s3"]["endpoint_url"]:
            tree["s3"]["endpoint_url"] = redact.url(tree["s3"]["endpoint_url"])
        return tree

    def secrets(self) -> tuple[str, ...]:
        """The secret strings this configuration holds, for the log writer to mask wherever
        they turn up (an exception's text, say)."""
        return redact.secrets_in_dsn(self.raw["db"]["dsn"]) + redact.secrets_in_dsn(self.raw["s3"]["endpoint_url"])


def _validate(tree: dict[str, Any], origin: str) -> None:
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{origin}: {key} {msg}")

    db = tree["db"]
    for key in ("artifacts_table", "state_schema"):
        if not _IDENT.match(db[key]):
            raise bad(f"db.{key}", f"must be a plain SQL identifier, got {db[key]!r}")
    positive = [("db", "page_size"), ("db", "flush_rows"), ("artifacts", "commit_batch"),
                ("artifacts", "max_uncommitted"),
                ("http", "timeout_s"), ("http", "connect_timeout_s"), ("http", "max_bytes"),
                ("http", "chunk_bytes"), ("run", "queue_rows"), ("report", "progress_interval_s"),
                ("db", "flush_interval_s"), ("artifacts", "commit_interval_s"), ("http", "retry_after_max_s"),
                ("run", "local_failure_limit"), ("artifacts", "git_min_bytes_per_s"), ("run", "heartbeat_s"),
                ("run", "lease_s"), ("run", "lease_groups")]
    for section, key in positive:
        if not tree[section][key] > 0:
            raise bad(f"{section}.{key}", f"must be greater than 0, got {tree[section][key]!r}")
    for section, key in [("http", "max_redirects"), ("http", "max_retries"), ("run", "drain_timeout_s"),
                         ("db", "statement_timeout_s"), ("db", "lock_timeout_s"), ("db", "idle_in_transaction_timeout_s"),
                         ("db", "outage_max_s"), ("recovery", "stream_resumes"), ("recovery", "staging_max_bytes"),
                         ("http", "head_404_confirm"), ("http", "head_404_recheck_every"),
                         ("http", "rate_guard_s"), ("recovery", "tarballs")]:
        if tree[section][key] < 0:
            raise bad(f"{section}.{key}", f"must not be negative, got {tree[section][key]!r}")
    if not worker_count_ok(tree["run"]["workers"]):
        raise bad("run.workers", f'{WORKERS_RULE}, got {tree["run"]["workers"]!r}')
    template = tree["artifacts"]["figure_path"]
    if "{ext}" not in template:
        raise bad("artifacts.figure_path", "must contain {ext}")
    if not tree["artifacts"]["path_resolver"]:
        # Without the id two rows could share one file, and each fetch would overwrite the other's.
        if "{artifact_id}" not in template:
            raise bad("artifacts.figure_path", f"must contain {{artifact_id}} so that no two rows share a file, got {template!r}")
        if template.startswith("/") or any(part in ("", ".", "..") for part in template.split("/")):
            raise bad("artifacts.figure_path", f"must be a relative path without '.', '..' or empty segments, got {template!r}")
    resolver = tree["artifacts"]["path_resolver"]
    if resolver and not re.match(r"^[\w.]+:\w+$", resolver):
        raise bad("artifacts.path_resolver", f"must be 'module:function', got {resolver!r}")
    for src, dst in tree["http"]["connect_to"].items():
        if not isinstance(dst, str) or not _HOSTPORT.match(src) or not _HOSTPORT.match(dst):
            raise bad(f"http.connect_to.{src!r}", f"must map 'host:port' to 'addr:port', got {dst!r}")
    if tree["http"]["ca_file"] and not Path(tree["http"]["ca_file"]).is_file():
        raise bad("http.ca_file", f"names no readable file: {tree['http']['ca_file']!r}")
    prefix = tree["recovery"]["s3_prefix"]
    if prefix and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/", prefix):
        raise bad("recovery.s3_prefix", f"must look like s3://bucket/prefix/ (or be empty), got {prefix!r}")
    if "default" not in tree["budgets"]:
        raise bad("budgets.default", "is required")
    for name, t in tree["budgets"].items():
        key = f"budgets.{name}"
        unknown = set(t) - {"hosts", "max_inflight", "rate_per_s"}
        if unknown:
            raise bad(f"{key}.{sorted(unknown)[0]}", "is not a budget key (hosts, max_inflight, rate_per_s)")
        if name != "default":
            hosts = t.get("hosts")
            if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
                raise bad(f"{key}.hosts", "must be a non-empty list of host names or '*.suffix' patterns")
        mi, rate = t.get("max_inflight"), t.get("rate_per_s")
        if isinstance(mi, bool) or not isinstance(mi, int) or mi < 1:
            raise bad(f"{key}.max_inflight", f"must be an integer of at least 1, got {mi!r}")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0:
            raise bad(f"{key}.rate_per_s", f"must be a number greater than 0, got {rate!r}")


def load(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Config:
    """The defaults, then the file at `path` (if any), then CRAWLER_DSN from `env` (os.environ)."""
    env = os.environ if env is None else env
    tree = load_defaults()
    origin = "default.toml"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{origin}: cannot read: {exc.strerror or exc}") from None
        try:
            override = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
        tree = _merge(tree, override, "", origin)
    origins = {k: origin for k in flatten(override)} if path is not None else {}
    if env.get(ENV_DSN):
        tree["db"]["dsn"] = env[ENV_DSN]
        origins["db.dsn"] = f"environment ({ENV_DSN})"
    _validate(tree, origin)
    return Config(tree, origin, origins)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} for every leaf of a config tree, in its order."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def from_tree(override: dict[str, Any], origin: str = "<test>") -> Config:
    """The defaults overridden by an in-memory tree (tests, the sandbox)."""
    tree = _merge(load_defaults(), override, "", origin)
    _validate(tree, origin)
    return Config(tree, origin)


def to_toml(tree: dict[str, Any], prefix: str = "") -> str:
    """Just enough TOML for a config tree (tables, strings, numbers, booleans, lists): the sandbox,
    tests and benchmarks write the config files they hand to the CLI with it."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} as TOML")
    scalars = [f"{json.dumps(k)} = {value(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    out = ([f"[{prefix}]"] if prefix and scalars else []) + scalars
    for k, v in tree.items():
        if isinstance(v, dict):
            out.append(to_toml(v, f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k)))
    return "\n".join(out) + "\n"
