"""A deterministic population of paper-figure rows plus the upstream routes that serve them.

``build_figure_scene(n_rows, with_files, seed)`` returns a :class:`FigureScene`:

* ``rows``: ``n_rows`` artifact rows (ids ``fig-000001``... in order). The first
  ``with_files`` already have a ``file_path`` whose bytes are in ``files``; they are
  never meant to be requested. Of the rest, about 60% point at Europe PMC, 28% at PMC,
  10% at publisher CDNs and 2% are garbage (no ``image_url`` key, null, "", or a
  malformed URL). Figures come grouped by paper (1-6 per paper, same source).
* ``routes``: ``(host, raw_path_qs) -> Behaviour | [Behaviour, ...]`` for every usable
  URL, keyed exactly as aiohttp will send it. About 97% of Europe PMC URLs are 404; the
  remaining URLs serve real images, except a few of each scripted failure (see
  ``SPECIAL_KINDS``). Garbage rows have no route.
* ``kinds``: row id -> what the upstream does for it ("image", "404", "present",
  "garbage", or one of ``SPECIAL_KINDS``), for demos and acceptance checks.
* ``hosts``: the distinct http(s) host names in ``rows`` (for the TLS certificate).

Everything is a function of ``seed``; the same arguments give equal scenes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from yarl import URL

from crawler.sandbox import images
from crawler.sandbox.simulator import Behaviour, http_date_in

__all__ = ["FigureScene", "SPECIAL_KINDS", "build_figure_scene"]

# Each appears SPECIALS_PER_KIND times among the PMC/CDN rows (fewer if the scene is tiny).
SPECIAL_KINDS = (
    "410", "451", "429-seconds", "429-date", "503-then-200", "503-forever", "reset",
    "slow", "truncated", "soft-404", "403", "head-405", "redirect",
)
SPECIALS_PER_KIND = 3
EPMC_SERVED_SHARE = 0.03  # Europe PMC mostly lacks the files: the rest of its URLs are 404

_EXT_TYPES = {
    "jpg": "image/jpeg", "png": "image/png", "gif": "image/gif",
    "tif": "image/tiff", "webp": "image/webp", "svg": "image/svg+xml",
}
_REPO_EXTS = (["jpg"] * 60 + ["png"] * 22 + ["gif"] * 6 + ["tif"] * 4 + ["webp"] * 4 + ["svg"] * 4)
# One in ten garbage rows lacks the key ("missing"); the rest are null, empty or malformed.
_GARBAGE = [None, "", "missing", None, "", "not a url", None, "", "ftp://x/y.png", "http://"]
_HTML = "text/html"
_WORDS = (
    "expression", "kinase", "tumour", "cohort", "survival", "mouse", "neuronal", "signalling",
    "binding", "mutant", "phylogeny", "structure", "infection", "receptor", "model", "response",
)


@dataclass
class FigureScene:
    rows: list[dict]
    routes: dict[tuple[str, str], Behaviour | list[Behaviour]]
    files: dict[str, bytes]
    hosts: list[str]
    kinds: dict[str, str] = field(default_factory=dict)


def _html(title: str) -> bytes:
    return f"<!DOCTYPE html><html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>".encode()


class _Papers:
    """Fresh, unique paper identities and per-source figure URLs."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.seen: set[str] = set()

    def paper(self) -> tuple[str, str]:
        while True:
            pmid = f"PMID-3{self.rng.randrange(10**7):07d}"
            pmcid = f"PMC{self.rng.randrange(1_000_000, 12_000_000)}"
            if pmid not in self.seen and pmcid not in self.seen:
                self.seen |= {pmid, pmcid}
                return pmid, pmcid

    def url_maker(self, family: str, pmcid: str):
        """A function figure_number -> URL for one paper of ``family``."""
        rng = self.rng
        ext = rng.choice(_REPO_EXTS)
        stem = rng.choice(["fig{k}", f"{rng.choice(['nihms', 'pone', 'jcb', 'elife'])}-{rng.randrange(10**5, 10**6)}-g{{k:03d}}"])
        if family == "epmc":
            if rng.random() < 0.75:
                return lambda k: f"https://europepmc.org/articles/{pmcid}/bin/{stem.format(k=k)}.{ext}"
            return lambda k: (
                f"https://www.ebi.ac.uk/europepmc/webservices/rest/{pmcid}/supplementaryFiles"
                f"?includeInlineImage=yes&name={stem.format(k=k)}.{ext}"
            )
        if family == "pmc":
            nihms = rng.randrange(100_000, 2_000_000)
            if rng.random() < 0.75:
                return lambda k: f"https://www.ncbi.nlm.nih.gov/pmc/articles/{pmcid}/bin/nihms-{nihms}-f{k:04d}.{ext}"
            return lambda k: f"https://pmc.ncbi.nlm.nih.gov/articles/{pmcid}/bin/{stem.format(k=k)}.{ext}"
        # Publisher CDNs, each with its own real-world URL shape.
        yy, n = rng.randrange(15, 25), rng.randrange(1000, 10000)
        publisher = rng.choice(["springer", "biorxiv", "elsevier", "plos"])
        if publisher == "springer":
            article = f"s41586-0{yy}-{n}-{rng.randrange(10)}"
            return lambda k: (
                "https://media.springernature.com/lw685/springer-static/image/"
                f"art%3A10.1038%2F{article}/MediaObjects/41586_20{yy}_{n}_Fig{k}_HTML.png"
            )
        if publisher == "biorxiv":
            m, d = rng.randrange(1, 13), rng.randrange(1, 29)
            day = f"20{yy}/{m:02d}/{d:02d}"
            return lambda k: (
                f"https://www.biorxiv.org/content/biorxiv/early/{day}/{day.replace('/', '.')}.{n:06d}/F{k}.large.jpg"
            )
        if publisher == "elsevier":
            pii = f"S{rng.choice(['0092867', '0140673', '0896627'])}4{yy}{n:05d}{rng.randrange(10)}"
            return lambda k: f"https://ars.els-cdn.com/content/image/1-s2.0-{pii}-gr{k}.jpg"
        doi = f"10.1371/journal.pone.{n:07d}"
        return lambda k: f"https://journals.plos.org/plosone/article/figure/image?size=large&id={doi}.g{k:03d}"


def _families(rng: random.Random, count: int) -> list[str]:
    """Exact per-family quotas for ``count`` rows (the remainder goes to Europe PMC)."""
    quotas = {"garbage": round(count * 0.02), "cdn": round(count * 0.10), "pmc": round(count * 0.28)}
    quotas["epmc"] = count - sum(quotas.values())
    return [f for f, q in quotas.items() for _ in range(q)]


def _content_type(url: URL) -> str:
    """The type a server would send for this URL's file name (Europe PMC's REST one is in ?name=)."""
    name = url.query.get("name") or url.name
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return _EXT_TYPES.get(suffix, "image/png")  # PLOS figure URLs have no suffix and serve PNG


def build_figure_scene(n_rows: int = 4302, with_files: int = 15, seed: int = 20260315) -> FigureScene:
    """Build the deterministic scene described in the module docstring."""
    rng = random.Random(seed)
    papers = _Papers(rng)
    scene = FigureScene(rows=[], routes={}, files={}, hosts=[])

    # Plan one (family, url, paper_id, pmcid, figure number) per row: the present rows
    # first, then whole papers drawn against exact per-family quotas.
    plan: list[tuple[str, str | None, str, str, int]] = []
    for _ in range(min(with_files, n_rows)):
        pmid, pmcid = papers.paper()
        plan.append(("present", papers.url_maker(rng.choice(["epmc", "pmc"]), pmcid)(1), pmid, pmcid, 1))
    pool = _families(rng, n_rows - len(plan))
    counts = {f: pool.count(f) for f in ("epmc", "pmc", "cdn", "garbage")}
    garbage = [_GARBAGE[i % len(_GARBAGE)] for i in range(counts["garbage"])]
    rng.shuffle(garbage)
    while any(counts.values()):
        family = rng.choices(list(counts), weights=list(counts.values()))[0]
        size = min(rng.randint(1, 6), counts[family])
        counts[family] -= size
        pmid, pmcid = papers.paper()
        make = (lambda k: garbage.pop()) if family == "garbage" else papers.url_maker(family, pmcid)
        plan.extend((family, make(k), pmid, pmcid, k) for k in range(1, size + 1))

    # Which servable rows serve an image, a 404, or a scripted failure.
    index_of = {fam: [i for i, p in enumerate(plan) if p[0] == fam] for fam in ("epmc", "pmc", "cdn")}
    served_epmc = set(rng.sample(index_of["epmc"], round(len(index_of["epmc"]) * EPMC_SERVED_SHARE)))
    candidates = index_of["pmc"] + index_of["cdn"]
    picked = rng.sample(candidates, min(len(candidates), SPECIALS_PER_KIND * len(SPECIAL_KINDS)))
    special = {i: SPECIAL_KINDS[j % len(SPECIAL_KINDS)] for j, i in enumerate(picked)}

    hosts: set[str] = set()
    for i, (family, raw_url, pmid, pmcid, figure_no) in enumerate(plan):
        row_id = f"fig-{i + 1:06d}"
        label = f"Figure {figure_no}"
        metadata: dict = {"paper_id": pmid, "pmcid": pmcid, "figure_label": label}
        if raw_url != "missing":
            metadata["image_url"] = raw_url
        row = {
            "id": row_id,
            "artifact_type": "paper_figure",
            "title": f"{label}. {' '.join(rng.sample(_WORDS, 3)).capitalize()}",
            "file_path": None,
            "metadata": metadata,
        }
        scene.rows.append(row)
        body_seed = seed * 7919 + i
        if family == "garbage":
            scene.kinds[row_id] = "garbage"
            continue
        url = URL(raw_url)
        hosts.add(url.host)
        if family == "present":
            row["file_path"] = f"figures/papers/{pmid}/{row_id}.png"
            scene.files[row["file_path"]] = images.png(body_seed, rng.randint(2_000, 60_000))
            scene.kinds[row_id] = "present"
            continue
        kind = special.get(i, "404" if family == "epmc" and i not in served_epmc else "image")
        scene.kinds[row_id] = kind
        scene.routes.update(_routes_for(kind, url, rng, body_seed))

    scene.hosts = sorted(hosts)
    return scene


def _routes_for(kind: str, url: URL, rng: random.Random, body_seed: int) -> dict:
    """The route(s) that make ``url`` behave as ``kind``."""
    key = (url.host, url.raw_path_qs)
    ctype = _content_type(url)

    def page(status: int, title: str, **kw) -> Behaviour:
        return Behaviour(status=status, body=_html(title), content_type=_HTML, **kw)

    if kind == "404":  # most rows: answer before paying for an image
        return {key: page(404, "404 Not Found")}
    # Slow bodies need several 16 KiB chunks for chunk_delay_s to matter.
    size = rng.randint(40_000, 60_000) if kind == "slow" else rng.randint(2_000, 60_000)
    body = images.MAKERS[ctype](body_seed, size)
    image = Behaviour(body=body, content_type=ctype)
    if kind == "image":
        return {key: image}
    if kind == "redirect":
        # A relative Location keeps the scene scheme-agnostic (plain HTTP in tests, TLS in the demo).
        location = "/moved" + url.raw_path_qs
        return {
            key: Behaviour(status=302, location=location, content_type=None),
            (url.host, url.join(URL(location)).raw_path_qs): image,
        }
    behaviour: Behaviour | list[Behaviour] = {
        "410": page(410, "410 Gone"),
        "451": page(451, "451 Unavailable For Legal Reasons",
                    headers={"Link": '<https://example.org/legal>; rel="blocked-by"'}),
        "429-seconds": [page(429, "429 Too Many Requests", retry_after="1"), image],
        "429-date": [page(429, "429 Too Many Requests", retry_after=http_date_in(1.0)), image],
        "503-then-200": [page(503, "503 Service Unavailable"), image],
        "503-forever": page(503, "503 Service Unavailable"),
        "reset": Behaviour(reset=True),
        "slow": Behaviour(body=body, content_type=ctype, chunk_delay_s=0.05),
        "truncated": Behaviour(body=body, content_type=ctype, truncate_to=len(body) // 2),
        "soft-404": page(200, "Page not found"),
        "403": page(403, "403 Forbidden"),
        "head-405": Behaviour(body=body, content_type=ctype, head_status=405),
    }[kind]
    return {key: behaviour}
