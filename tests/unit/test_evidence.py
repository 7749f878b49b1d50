from crawler.evidence import (UNREADABLE_SHA, Candidate, TypeRules, approve, decide_all, expect, extension_of,
                              relevant)

DATASET = TypeRules(("datasets/",), (".csv", ".parquet", ".csv.gz"), "datasets/{basename}")
A, B, C = "a" * 64, "b" * 64, "c" * 64


def cand(where: str, rel: str, sha: str, size: int = 10) -> Candidate:
    kind = where.split(":")[0] if not where.startswith("s3://") else "s3"
    return Candidate(where, kind, rel, size, sha)


def test_extensions_prefer_the_longest_known():
    assert extension_of("x.CSV.gz", DATASET.extensions) == ".csv.gz"
    assert extension_of("x.tar", DATASET.extensions) == ".tar"


def test_expectation_reads_the_row_and_ignores_garbage():
    e = expect("d1", "dataset", {"filename": "../../gtex.parquet", "expected_path": "datasets/gtex.parquet",
                                 "file_sha256": "NOT-A-SHA", "file_size_bytes": "12", "format": "parquet"}, DATASET)
    assert e.basenames == {"gtex.parquet"} and e.expected_paths == ("datasets/gtex.parquet",)
    assert e.sha256 == UNREADABLE_SHA and e.size is None and len(e.notes) == 1
    assert expect("d2", "dataset", {"expected_path": "/etc/passwd"}, DATASET).expected_paths == ()
    assert expect("d3", "dataset", ["garbage"], DATASET).notes == ("metadata is not a JSON object",)


def test_ram_only_rows_are_lost_for_good():
    assert expect("m", "model", {"storage": "memory"}, DATASET).lost_reason
    assert expect("m", "model", {"created_by": "forge.ephemeral"}, DATASET, ["forge.ephemeral"]).lost_reason
    d = decide_all([expect("m", "model", {"storage": "memory", "filename": "m.pkl"}, DATASET)],
                   [cand("checkout", "models/m.pkl", A)])
    assert d["m"].status == "unrecoverable"


def test_certain_binds_by_sha_under_any_name():
    e = expect("d", "dataset", {"filename": "gtex.parquet", "file_sha256": A.upper()}, DATASET)
    d = decide_all([e], [cand("s3://b/k.tar.gz#x/renamed.bin", "x/renamed.bin", A),
                         cand("checkout", "datasets/gtex.parquet", B)])["d"]
    assert (d.status, d.confidence, d.chosen.rel_path) == ("bound", "certain", "x/renamed.bin")


def test_a_recorded_sha_forbids_any_other_content():
    e = expect("d", "dataset", {"expected_path": "datasets/gtex.parquet", "file_sha256": A}, DATASET)
    d = decide_all([e], [cand("checkout", "datasets/gtex.parquet", B)])["d"]
    assert d.status == "needs_review" and d.chosen is None


def test_high_at_the_expected_path_with_matching_size():
    e = expect("d", "dataset", {"expected_path": "datasets/t/gtex.parquet", "file_size_bytes": 10}, DATASET)
    d = decide_all([e], [cand("worktree:w1", "datasets/t/gtex.parquet", A, 10)])["d"]
    assert (d.status, d.confidence, d.chosen.where) == ("bound", "high", "worktree:w1")
    wrong_size = decide_all([e], [cand("worktree:w1", "datasets/t/gtex.parquet", A, 11)])["d"]
    assert wrong_size.status == "needs_review"


def test_medium_needs_one_content_and_no_rival_claim():
    e = expect("d", "dataset", {"filename": "gtex.csv"}, DATASET)
    one = decide_all([e], [cand("checkout", "old/gtex.csv", A), cand("history:abc", "x/gtex.csv", A)])["d"]
    assert (one.status, one.confidence, one.chosen.kind) == ("bound", "medium", "checkout")
    two = decide_all([e], [cand("checkout", "old/gtex.csv", A), cand("worktree:w", "gtex.csv", B)])["d"]
    assert two.status == "needs_review" and "2 different contents" in two.reason
    rival = expect("d2", "dataset", {"filename": "gtex.csv"}, DATASET)
    claimed = decide_all([e, rival], [cand("checkout", "old/gtex.csv", A)])
    assert claimed["d"].status == claimed["d2"].status == "needs_review"


def test_claims_are_scoped_per_type():
    e = expect("d", "dataset", {"filename": "t.csv"}, DATASET)
    other_type = expect("t", "tabular_dataset", {"filename": "t.csv"}, DATASET)
    d = decide_all([e, other_type], [cand("checkout", "t.csv", A)])
    assert d["d"].status == "bound"


def test_low_is_never_bound_and_missing_is_missing():
    e = expect("d", "dataset", {"filename": "gtex.csv"}, DATASET)
    low = decide_all([e], [cand("checkout", "datasets/gtex.parquet", A)])["d"]
    assert (low.status, low.confidence) == ("needs_review", "low")
    assert decide_all([e], [cand("checkout", "datasets/other.csv", A)])["d"].status == "missing"


def test_approval_binds_exactly_the_named_candidate():
    e = expect("d", "dataset", {"filename": "gtex.csv"}, DATASET)
    c1, c2 = cand("checkout", "a/gtex.csv", A), cand("worktree:w", "gtex.csv", B)
    related = [(relevant(e, c), c) for c in (c1, c2)]
    d = approve(e, related, "worktree:w:gtex.csv")
    assert d is not None and d.chosen is c2 and d.status == "bound"
    assert approve(e, related, "checkout:nope.csv") is None
    sha_row = expect("s", "dataset", {"filename": "gtex.csv", "file_sha256": C}, DATASET)
    assert approve(sha_row, [(relevant(sha_row, c1), c1)], c1.ref) is None


def test_recorded_sha_forms_are_normalised_and_an_unreadable_one_blocks_binds():
    assert expect("d", "dataset", {"file_sha256": f" sha256:{A.upper()} "}, DATASET).sha256 == A
    e = expect("d", "dataset", {"expected_path": "datasets/x.csv", "file_sha256": "md5:1234"}, DATASET)
    d = decide_all([e], [cand("checkout", "datasets/x.csv", B)])["d"]
    assert d.status == "needs_review" and "cannot be read" in d.reason


def test_the_exact_name_with_an_unlisted_extension_is_low_not_missing():
    e = expect("m", "model", {"filename": "weights.bin"}, DATASET)
    d = decide_all([e], [cand("checkout", "models/weights.bin", A)])["m"]
    assert (d.status, d.confidence) == ("needs_review", "low")


def test_a_bound_rows_content_is_claimed():
    e = expect("b", "dataset", {"filename": "results.csv"}, DATASET)
    c = cand("checkout", "datasets/results.csv", A)
    assert decide_all([e], [c])["b"].status == "bound"
    d = decide_all([e], [c], bound=[("a", "dataset", A)])["b"]
    assert d.status == "needs_review" and "claimed by a" in d.reason
    assert decide_all([e], [c], bound=[("a", "model", A)])["b"].status == "bound"  # other type: no claim
