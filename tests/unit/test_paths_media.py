from pathlib import Path

import pytest

from crawler import media, paths
from crawler.fetcher import blocked_by, parse_retry_after
from crawler.netguard import BlockedAddress, GuardedResolver, is_blocked_ip
from crawler.budgets import Budgets
from crawler.config import BudgetSpec


def canonical(root: Path, artifact_id: str, meta: dict, template="figures/papers/{paper_id}/{artifact_id}{ext}"):
    return paths.contain(root, paths.template_resolver(template)(paths.figure_fields(artifact_id, meta, ".png")))


def test_template_renders_and_missing_fields_are_unknown(tmp_path):
    assert canonical(tmp_path, "fig-1", {"paper_id": "PMID-1"}) == "figures/papers/PMID-1/fig-1.png"
    assert canonical(tmp_path, "fig-1", {}) == "figures/papers/unknown/fig-1.png"


@pytest.mark.parametrize("artifact_id, meta", [
    ("../../etc/passwd", {"paper_id": "x"}),
    ("fig", {"paper_id": "../../../outside"}),
    ("fig", {"paper_id": "/etc"}),
    ("..", {"paper_id": ".."}),
])
def test_hostile_ids_stay_inside_the_root(tmp_path, artifact_id, meta):
    rel = canonical(tmp_path, artifact_id, meta)
    assert (tmp_path / rel).resolve().is_relative_to(tmp_path.resolve())
    assert ".." not in Path(rel).parts


@pytest.mark.parametrize("template", ["../{artifact_id}{ext}", "/tmp/{artifact_id}{ext}", ".git/{artifact_id}{ext}"])
def test_templates_that_escape_are_refused(tmp_path, template):
    with pytest.raises(paths.PathError):
        canonical(tmp_path, "fig", {}, template)


def test_symlink_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "root"
    (root / "figures").mkdir(parents=True)
    (root / "figures" / "papers").symlink_to(tmp_path)
    with pytest.raises(paths.PathError, match="link"):
        canonical(root, "fig", {"paper_id": "p"})


def test_unknown_template_field_and_bad_resolver():
    with pytest.raises(paths.PathError, match="unknown field"):
        paths.template_resolver("{nope}{ext}")
    with pytest.raises(paths.PathError, match="cannot be loaded"):
        paths.load_resolver("{ext}", "no_such_module:fn")


@pytest.mark.parametrize("head, ext", [
    (b"\x89PNG\r\n\x1a\n....", ".png"), (b"\xff\xd8\xff\xe0", ".jpg"), (b"GIF89a..", ".gif"),
    (b"II*\x00....", ".tif"), (b"RIFF\x00\x00\x00\x00WEBPVP8 ", ".webp"),
    (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg">', ".svg"),
    (b"<!doctype html><html>Not found</html>", None), (b"", None),
])
def test_sniff(head, ext):
    assert media.sniff(head) == ext


def test_content_type_must_agree():
    assert media.agrees("image/png; charset=binary", ".png")
    assert media.agrees("application/octet-stream", ".jpg")
    assert not media.agrees("text/html", ".png")


def test_retry_after_forms():
    assert parse_retry_after("7", None) == 7.0
    date = "Wed, 21 Oct 2026 07:28:00 GMT"
    assert parse_retry_after("Wed, 21 Oct 2026 07:28:05 GMT", date) == 5.0
    assert parse_retry_after("Wed, 21 Oct 2026 07:27:00 GMT", date) == 0.0
    assert parse_retry_after("soon", date) is None
    assert parse_retry_after(None, None) is None


@pytest.mark.parametrize("value", [
    "99999999999999999999999", "1" * 400, "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_retry_after_that_is_huge_is_clamped(value):
    assert parse_retry_after(value, None, 86400.0) == 86400.0


@pytest.mark.parametrize("value", ["-5", "\u00b2", "\u0661\u0662", "\uff13", "3.5", "1e9", " ", "\x00", "Mon, 99 Foo", "Sat, 01 Jan 10000 00:00:00 GMT"])
def test_retry_after_that_is_not_a_number_or_date_is_ignored(value):
    assert parse_retry_after(value, "garbage", 86400.0) is None


def test_retry_after_in_the_past_is_zero():
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT", None, 86400.0) == 0.0


def test_blocked_by_link():
    assert blocked_by('<https://example.org/legal>; rel="blocked-by"') == "https://example.org/legal"
    assert blocked_by('<https://x>; rel="next"') is None
    assert blocked_by('<https://a>; rel="next", <https://b/why>; rel=blocked-by') == "https://b/why"
    assert blocked_by('<https://a>; title="x, y"; rel="blocked-by"') is None  # no quoted commas: not found, no harm
    assert blocked_by("garbage") is None and blocked_by(None) is None


@pytest.mark.parametrize("addr, blocked", [
    ("127.0.0.1", True), ("10.1.2.3", True), ("192.168.0.1", True), ("172.16.5.4", True),
    ("169.254.169.254", True), ("::1", True), ("fe80::1", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", True), ("93.184.216.34", False), ("2606:4700::1111", False),
    # not globally routable, though not "private" to older checks
    ("100.64.0.1", True), ("100.127.255.254", True), ("198.18.0.1", True), ("192.0.2.1", True),
    ("2001:db8::1", True), ("240.0.0.1", True), ("255.255.255.255", True), ("224.0.0.1", True),
    ("::ffff:100.64.0.1", True), ("2002:a00:1::1", True), ("2002:5db8:d822::1", False),
])
def test_private_addresses(addr, blocked):
    assert is_blocked_ip(addr) is blocked


async def test_resolver_connect_to_and_literals():
    r = GuardedResolver({"europepmc.org:443": "127.0.0.1:8443"}, allow_private=False)
    try:
        [answer] = await r.resolve("EuropePMC.org", 443)
        assert (answer["host"], answer["port"], answer["hostname"]) == ("127.0.0.1", 8443, "EuropePMC.org")
        with pytest.raises(BlockedAddress):
            r.check_literal("10.0.0.1", 80)
        with pytest.raises(BlockedAddress):
            await r.resolve("localhost", 80)
        r.check_literal("93.184.216.34", 80)
    finally:
        await r.close()


def test_budget_routing_shares_a_provider_and_splits_default():
    b = Budgets([BudgetSpec("default", (), 1, 1.0), BudgetSpec("epmc", ("europepmc.org", "www.ebi.ac.uk"), 4, 2.0),
                 BudgetSpec("pmc", ("*.ncbi.nlm.nih.gov",), 2, 2.0)], 0.0)
    assert b.name_for("www.ebi.ac.uk") == b.name_for("EUROPEPMC.ORG") == "epmc"
    assert b.name_for("pmc.ncbi.nlm.nih.gov") == "pmc"
    assert b.name_for("ncbi.nlm.nih.gov") == "default:ncbi.nlm.nih.gov"
    assert b.name_for("a.com") != b.name_for("b.com")


def test_fractional_rates_never_exceed_the_window():
    from crawler.budgets import spacing_s
    assert spacing_s(2.0, 0) == 0.5 and spacing_s(0.5, 0) == 2.0
    assert spacing_s(1.5, 0) == 1.0  # 1.5/s as a hard ceiling per one-second window is 1 per window


def test_artifact_ids_map_to_distinct_files(tmp_path):
    ids = ["fig/1", "fig_1", "fig 1", "fig:1.", "x" * 130 + "a", "x" * 130 + "b"]
    rels = {canonical(tmp_path, i, {"paper_id": "P"}) for i in ids}
    assert len(rels) == len(ids)
    assert canonical(tmp_path, "fig-000001", {"paper_id": "P"}) == "figures/papers/P/fig-000001.png"


def test_contain_all_agrees_with_contain_path_by_path(tmp_path):
    import pytest

    from crawler import paths
    (tmp_path / "inside").mkdir()
    (tmp_path / "out").symlink_to("/")  # a link already on disk leading out of the root
    cases = [["a/b/c.png", "a/b/c.jpg"], ["c.png", "c.jpg"], ["./a/../b/x.png", "./a/../b/x.jpg"],
             ["a//b/x.png", "a//b/x.jpg"], ["a/b/x.png", "z/x.jpg"], ["x.png", ".git"]]
    for rels in cases:
        try:
            expected = [paths.contain(tmp_path, r) for r in rels]
        except paths.PathError:
            with pytest.raises(paths.PathError):
                paths.contain_all(tmp_path, rels)
            continue
        assert paths.contain_all(tmp_path, rels) == expected
    for escaping in (["../x.png", "../x.jpg"], ["out/x.png", "out/x.jpg"], ["/etc/x.png", "/etc/x.jpg"]):
        with pytest.raises(paths.PathError):
            paths.contain_all(tmp_path, escaping)


def test_contain_all_refuses_what_contain_refuses_in_the_first_ones_folder(tmp_path):
    import pytest

    from crawler import paths
    for rels in (["x/../a.png", "x/../.git"], ["a.png", "/x"], ["a.png", "b" * 300 + ".png"], ["a.png", 7]):
        with pytest.raises(paths.PathError):
            paths.contain_all(tmp_path, rels)  # type: ignore[list-item]


def test_an_image_cut_short_is_not_taken_for_complete():
    from crawler import media
    from crawler.sandbox import images
    png = images.png(7, 2000)
    assert media.looks_complete(".png", png[:64], png[-64:], len(png))
    cut = png[:1500]
    assert not media.looks_complete(".png", cut[:64], cut[-64:], len(cut))
    assert not media.looks_complete(".tif", b"II*\x00", b"", 10)  # no end marker: never trusted
    for ext, body in ((".jpg", images.jpeg(3)), (".gif", images.gif(3)), (".webp", images.webp(3)),
                      (".svg", images.svg(3))):
        assert media.sniff(body[:1024]) == ext
        assert media.looks_complete(ext, body[:1024], body[-64:], len(body)), ext
        cut = body[: len(body) // 2]
        assert not media.looks_complete(ext, cut[:1024], cut[-64:], len(cut)), ext


def test_a_tiff_is_complete_when_everything_its_directory_names_is_there():
    import struct

    from crawler import media
    from crawler.sandbox import images

    def complete(body: bytes) -> bool:
        return media.looks_complete(".tif", body[:1024], body[-64:], len(body), lambda o, n: body[o:o + n])

    tif = images.tiff(4, 3000)
    assert complete(tif)
    assert not media.looks_complete(".tif", tif[:1024], tif[-64:], len(tif))  # no way to look: not trusted
    assert not any(complete(tif[:cut]) for cut in range(0, len(tif), 7))
    # The image data after the directory (as many writers place it): a cut into the data shows too.
    ifd = struct.pack("<H", 2) + struct.pack("<HHII", 273, 4, 1, 8 + 2 + 24 + 4) + struct.pack("<HHII", 279, 4, 1, 500)
    data_after = b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4 + bytes(500)
    assert complete(data_after) and not complete(data_after[:-1])
    # Big-endian, strips as SHORTs stored out of line.
    strips = struct.pack(">3H", 64, 96, 128) + struct.pack(">3H", 32, 32, 32)
    ifd = (struct.pack(">H", 2) + struct.pack(">HHII", 273, 3, 3, 38) + struct.pack(">HHII", 279, 3, 3, 44)
           + b"\x00" * 4)
    be = b"MM\x00*" + struct.pack(">I", 8) + ifd + strips + bytes(160 - 50)
    assert len(be) == 160 and complete(be) and not complete(be[:159])
    # A directory pointing past the end, a loop of nonsense, no image data at all: not complete.
    assert not complete(b"II*\x00" + struct.pack("<I", 10_000) + bytes(100))
    assert not complete(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 0) + bytes(10))
