"""Tests for training/evaluate.py: the revisited protocol against the real roxford5k/rparis6k ground truth
and an independent loop implementation of revisitop's definitions, plus labelled-set and asymmetric metrics."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.evaluate import (
    QueryGT,
    asymmetric_eval,
    class_map,
    compute_ap,
    compute_map,
    format_table,
    labelled_eval,
    labelled_eval_scores,
    load_gnd,
    ranks_from_scores,
    recall_at_k,
    revisited_eval,
)

DATASETS = ("roxford5k", "rparis6k")
KAPPAS = (1, 5, 10)


# ---------------------------------------------------------------------------------------------------------
# An independent reference: revisitop's definitions as one plain-Python scan down each ranked list,
# in revisitop's own (n_db, n_queries) orientation, with gnd dicts built straight from the pickle.
# ---------------------------------------------------------------------------------------------------------


def reference_compute_map(ranks_db_by_q, gnd, kappas):
    n_db, n_q = ranks_db_by_q.shape
    aps, prs = [], []
    for i in range(n_q):
        ok_list = [int(x) for x in gnd[i]["ok"]]
        if not ok_list:
            aps.append(float("nan"))
            prs.append([float("nan")] * len(kappas))
            continue
        ok, junk = set(ok_list), {int(x) for x in gnd[i].get("junk", [])}
        positive_ranks, junk_seen = [], 0
        for position in range(n_db):
            image = int(ranks_db_by_q[position, i])
            if image in ok:
                positive_ranks.append(position - junk_seen)
            if image in junk:  # counted for the positives after it only
                junk_seen += 1
        ap = 0.0
        for j, rank in enumerate(positive_ranks):
            precision_0 = 1.0 if rank == 0 else j / rank
            precision_1 = (j + 1) / (rank + 1)
            ap += (precision_0 + precision_1) / 2.0 / len(ok_list)
        aps.append(ap)
        one_based = [r + 1 for r in positive_ranks]
        row = []
        for kappa in kappas:
            if not one_based:  # a top-k list holding none of the positives (revisitop's max() fails here)
                row.append(0.0)
                continue
            kq = min(max(one_based), kappa)
            row.append(sum(1 for r in one_based if r <= kq) / kq)
        prs.append(row)
    valid = [i for i in range(n_q) if not math.isnan(aps[i])]
    mean_ap = sum(aps[i] for i in valid) / len(valid)
    mean_pr = [sum(prs[i][j] for i in valid) / len(valid) for j in range(len(kappas))]
    return mean_ap, np.array(aps), np.array(mean_pr), np.array(prs)


def raw_setups(raw):
    """The three setups exactly as revisitop's example_evaluate.py builds them from the raw pickle."""
    out = {"easy": [], "medium": [], "hard": []}
    for q in raw["gnd"]:
        out["easy"].append({"ok": list(q["easy"]), "junk": list(q["junk"]) + list(q["hard"])})
        out["medium"].append({"ok": list(q["easy"]) + list(q["hard"]), "junk": list(q["junk"])})
        out["hard"].append({"ok": list(q["hard"]), "junk": list(q["junk"]) + list(q["easy"])})
    return out


def ranking_starting_with(first, n_db):
    """A full ranking: the indices in `first` (in that order), then every other index ascending."""
    first = [int(x) for x in first]
    taken = set(first)
    return np.array(first + [x for x in range(n_db) if x not in taken], dtype=np.int64)


@pytest.fixture(scope="module", params=DATASETS)
def dataset(request, revisitop_dir):
    path = revisitop_dir / f"gnd_{request.param}.pkl"
    with path.open("rb") as f:
        raw = pickle.load(f)
    return request.param, load_gnd(path), raw


# ---------------------------------------------------------------------------------------------------------
# Ground-truth files
# ---------------------------------------------------------------------------------------------------------


def test_load_gnd_reads_the_real_files(dataset):
    name, gt, raw = dataset
    assert gt.name == name
    assert gt.n_queries == 70 == len(gt.gnd)
    assert gt.n_db == len(raw["imlist"]) and gt.n_db > 4900
    assert gt.qimlist == list(raw["qimlist"]) and gt.imlist == list(raw["imlist"])
    for q, r in zip(gt.gnd, raw["gnd"]):
        assert q.easy.tolist() == list(r["easy"]) and q.hard.tolist() == list(r["hard"])
        assert q.junk.tolist() == list(r["junk"]) and q.bbx == tuple(r["bbx"])
        assert q.easy.dtype == np.int64


def test_setups_match_revisitop_example(dataset):
    _, gt, raw = dataset
    for difficulty, expected in raw_setups(raw).items():
        ours = gt.setup(difficulty)
        assert [sorted(q.ok.tolist()) for q in ours] == [sorted(e["ok"]) for e in expected]
        assert [sorted(q.junk.tolist()) for q in ours] == [sorted(e["junk"]) for e in expected]
    with pytest.raises(ValueError, match="difficulty must be one of"):
        gt.setup("extreme")


def test_load_gnd_rejects_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gnd(tmp_path / "gnd_missing.pkl")

    garbage = tmp_path / "gnd_garbage.pkl"
    garbage.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="not a readable pickle"):
        load_gnd(garbage)

    def dump(name, obj):
        p = tmp_path / name
        p.write_bytes(pickle.dumps(obj))
        return p

    with pytest.raises(ValueError, match=r"lacks keys \['qimlist'\]"):
        load_gnd(dump("gnd_a.pkl", {"gnd": [], "imlist": []}))
    with pytest.raises(ValueError, match="holds a list"):
        load_gnd(dump("gnd_b.pkl", [1, 2]))
    old_protocol = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"ok": [0], "junk": [1], "bbx": [0, 0, 1, 1]}]}
    with pytest.raises(ValueError, match="old-protocol"):
        load_gnd(dump("gnd_c.pkl", old_protocol))
    out_of_range = {"imlist": ["a", "b"], "qimlist": ["q"],
                    "gnd": [{"easy": [0], "hard": [7], "junk": [], "bbx": [0, 0, 1, 1]}]}
    with pytest.raises(ValueError, match="index 7, out of range for a database of 2"):
        load_gnd(dump("gnd_d.pkl", out_of_range))
    inconsistent = {"imlist": ["a"], "qimlist": ["q", "r"], "gnd": []}
    with pytest.raises(ValueError, match="gnd has 0 entries but qimlist has 2"):
        load_gnd(dump("gnd_e.pkl", inconsistent))
    bad_box = {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": [], "bbx": None}]}
    with pytest.raises(ValueError, match=r"\['bbx'\] is None, expected 4 numbers"):
        load_gnd(dump("gnd_f.pkl", bad_box))


# ---------------------------------------------------------------------------------------------------------
# compute_ap by hand
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ranks, n_pos, expected",
    [
        # one positive at rank 0: p0 = 1, p1 = 1/1  -> (1 + 1)/2 * 1 = 1
        ([0], 1, 1.0),
        # one positive at rank 1: p0 = 0/1, p1 = 1/2 -> (0 + 1/2)/2 = 1/4
        ([1], 1, 0.25),
        # ranks [0, 2] of 2: j=0: (1 + 1)/2 * 1/2 = 1/2; j=1, r=2: p0 = 1/2, p1 = 2/3 -> (7/6)/2 * 1/2 = 7/24
        ([0, 2], 2, 0.5 + 7 / 24),
        # ranks [1, 2] of 2: j=0, r=1: (0 + 1/2)/4 = 1/8; j=1, r=2: 7/24 -> 1/8 + 7/24 = 5/12
        ([1, 2], 2, 5 / 12),
        # one of two positives retrieved, at rank 0: the other adds nothing -> 1/2
        ([0], 2, 0.5),
        # nothing retrieved
        ([], 3, 0.0),
    ],
)
def test_compute_ap_by_hand(ranks, n_pos, expected):
    assert compute_ap(np.array(ranks, dtype=np.int64), n_pos) == pytest.approx(expected, abs=1e-15)


def test_compute_ap_rejects_bad_input():
    with pytest.raises(ValueError, match="sorted ascending"):
        compute_ap([3, 1], 2)
    with pytest.raises(ValueError, match="n_positives=1 must be >= 1 and >= the 2 ranks"):
        compute_ap([0, 1], 1)
    with pytest.raises(ValueError, match="n_positives=0"):
        compute_ap([], 0)
    with pytest.raises(ValueError, match="integer"):
        compute_ap([0.5], 1)


# ---------------------------------------------------------------------------------------------------------
# compute_map on small hand-made cases
# ---------------------------------------------------------------------------------------------------------


def test_compute_map_by_hand_with_junk_and_an_empty_query():
    ranks = np.array([
        [0, 3, 1, 5, 2, 4],  # junk 0 removed -> [3, 1, 5, 2, 4]: positives 3, 5 at ranks 0, 2 -> AP 19/24
        [0, 1, 2, 3, 4, 5],  # no positives: NaN, not averaged
        [0, 1, 2, 3, 4, 5],  # positive 4 at rank 4: p0 = 0, p1 = 1/5 -> AP 1/10
    ])
    gnd = [QueryGT(np.array([3, 5]), np.array([0])), {"ok": []}, {"ok": [4], "junk": []}]
    res = compute_map(ranks, gnd, kappas=(1, 5, 10))
    assert res.aps[0] == pytest.approx(19 / 24, abs=1e-15)
    assert math.isnan(res.aps[1]) and np.isnan(res.p_at_k[1]).all()
    assert res.aps[2] == pytest.approx(0.1, abs=1e-15)
    assert res.n_evaluated == 2
    assert res.map == pytest.approx((19 / 24 + 0.1) / 2, abs=1e-15)
    # query 0: 1-based [1, 3]; k=1 -> 1/1; k=5,10 -> kq = min(3, k) = 3 -> 2/3
    # query 2: 1-based [5]; k=1 -> kq=1, 0/1; k=5,10 -> kq = 5 -> 1/5
    np.testing.assert_allclose(res.p_at_k[0], [1, 2 / 3, 2 / 3], atol=1e-15)
    np.testing.assert_allclose(res.p_at_k[2], [0, 1 / 5, 1 / 5], atol=1e-15)
    np.testing.assert_allclose(res.mp_at_k, [0.5, (2 / 3 + 0.2) / 2, (2 / 3 + 0.2) / 2], atol=1e-15)


def test_compute_map_matches_reference_on_overlapping_and_duplicated_gnd():
    """Edge semantics of revisitop: an index both ok and junk, duplicates in ok (counted in n_positives)."""
    rng = np.random.default_rng(7)
    n_db, n_q = 40, 25
    gnd = []
    for i in range(n_q):
        ok = rng.choice(n_db, size=rng.integers(0, 6), replace=True).tolist()  # duplicates possible
        junk = rng.choice(n_db, size=rng.integers(0, 8), replace=True).tolist() + ok[:1]  # overlaps ok
        gnd.append({"ok": ok, "junk": junk})
    gnd[0]["ok"] = [5, 9]  # make sure some query has positives
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)])
    ours = compute_map(ranks, gnd, KAPPAS)
    ref_map, ref_aps, ref_mpr, ref_prs = reference_compute_map(ranks.T, gnd, KAPPAS)
    assert ours.map == pytest.approx(ref_map, abs=1e-12)
    np.testing.assert_allclose(ours.aps, ref_aps, atol=1e-12, rtol=0)
    np.testing.assert_allclose(ours.mp_at_k, ref_mpr, atol=1e-12, rtol=0)
    np.testing.assert_allclose(ours.p_at_k, ref_prs, atol=1e-12, rtol=0)


def test_compute_map_errors():
    gnd = [{"ok": [1]}, {"ok": [2]}]
    good = np.array([[0, 1, 2], [2, 1, 0]])
    with pytest.raises(ValueError, match=r"pass ranks\.T"):
        compute_map(good.T[:, :2], gnd)  # (n_db, n_queries) = (3, 2)
    with pytest.raises(ValueError, match="ranks row 1 lists id 2 more than once"):
        compute_map(np.array([[0, 1, 2], [2, 2, 0]]), gnd)
    with pytest.raises(ValueError, match="ranks row 0 lists id 1 more than once"):
        compute_map(np.array([[1, 1], [2, 0]]), gnd, n_db=3)
    with pytest.raises(ValueError, match="ranks row 1 holds id 3, out of range for the database of 3"):
        compute_map(np.array([[0, 1], [3, 0]]), gnd, n_db=3)
    with pytest.raises(ValueError, match="ranks row 0 holds id -1"):
        compute_map(np.array([[-1, 1], [2, 0]]), gnd, n_db=3)
    with pytest.raises(ValueError, match="ranks list 4 ids per query but the database has 3 images"):
        compute_map(np.array([[0, 1, 2, 0], [2, 1, 0, 0]]), gnd, n_db=3)
    with pytest.raises(ValueError, match="no columns"):
        compute_map(np.zeros((2, 0), dtype=np.int64), gnd, n_db=3)
    with pytest.raises(ValueError, match="integer array.*ranks_from_scores"):
        compute_map(good.astype(np.float32), gnd)
    with pytest.raises(ValueError, match="out of range for a database of 3"):
        compute_map(good, [{"ok": [1]}, {"ok": [3]}])
    with pytest.raises(ValueError, match="no query has a positive"):
        compute_map(good, [{"ok": []}, {"ok": []}])
    with pytest.raises(ValueError, match="kappas must be positive integers"):
        compute_map(good, gnd, kappas=(0, 5))
    with pytest.raises(ValueError, match="QueryGT or a dict with an 'ok' key"):
        compute_map(good, [{"easy": [1]}, {"ok": [2]}])


# ---------------------------------------------------------------------------------------------------------
# The revisited protocol on the real ground truth
# ---------------------------------------------------------------------------------------------------------


def test_perfect_ranking_scores_one_in_every_setup(dataset):
    """easy, then hard, then junk first: Easy sees hard as junk, Hard sees easy as junk -> all 1.0."""
    _, gt, raw = dataset
    ranks = np.stack([ranking_starting_with(list(q["easy"]) + list(q["hard"]) + list(q["junk"]), gt.n_db)
                      for q in raw["gnd"]])
    res = revisited_eval(ranks, gt)
    for r in (res.easy, res.medium, res.hard):
        assert r.map == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(r.mp_at_k, 1.0, atol=1e-12)
    assert res.easy.n_evaluated == sum(1 for q in raw["gnd"] if len(q["easy"]) > 0)
    assert res.medium.n_evaluated == 70


def test_queries_without_easy_positives_are_excluded(revisitop_dir):
    """roxford5k has queries with no easy image: NaN in Easy, and the mean is over the rest."""
    with (revisitop_dir / "gnd_roxford5k.pkl").open("rb") as f:
        raw = pickle.load(f)
    gt = load_gnd(revisitop_dir / "gnd_roxford5k.pkl")
    empty = [i for i, q in enumerate(raw["gnd"]) if len(q["easy"]) == 0]
    assert empty, "the real roxford5k gnd has queries without easy positives"
    ranks = ranks_from_scores(np.random.default_rng(0).random((gt.n_queries, gt.n_db)))
    res = revisited_eval(ranks, gt)
    assert np.isnan(res.easy.aps[empty]).all()
    assert not np.isnan(np.delete(res.easy.aps, empty)).any()
    assert res.easy.n_evaluated == 70 - len(empty)
    assert res.easy.map == pytest.approx(np.delete(res.easy.aps, empty).mean(), abs=1e-15)


def test_junk_anywhere_does_not_change_medium_ap(dataset):
    _, gt, raw = dataset
    rng = np.random.default_rng(1)
    ranks = np.stack([rng.permutation(gt.n_db) for _ in range(gt.n_queries)])
    junk_first = []
    for row, q in zip(ranks, raw["gnd"]):
        junk = set(q["junk"])
        junk_first.append([x for x in row if x in junk] + [x for x in row if x not in junk])
    before, after = revisited_eval(ranks, gt), revisited_eval(np.array(junk_first), gt)
    np.testing.assert_allclose(after.medium.aps, before.medium.aps, atol=1e-15, rtol=0)
    assert after.medium.map == before.medium.map


def test_interleaved_positives_give_the_hand_computed_ap(dataset):
    """Medium positives at ranks 0, 2, 4, ...: AP = (1/2n) [2 + sum_{j>=1} (1/2 + (j+1)/(2j+1))]."""
    _, gt, raw = dataset
    rows, expected_ap, expected_pk = [], [], []
    for q in raw["gnd"]:
        ok = list(q["easy"]) + list(q["hard"])
        fillers = sorted(set(range(gt.n_db)) - set(ok) - set(q["junk"]))
        first = [x for pair in zip(ok, fillers) for x in pair]
        rows.append(ranking_starting_with(first, gt.n_db))
        n = len(ok)
        expected_ap.append((2 + sum(0.5 + (j + 1) / (2 * j + 1) for j in range(1, n))) / (2 * n))
        # 1-based positions 1, 3, 5, ...: kq = min(2n - 1, k), and (kq + 1) // 2 of them are <= kq
        expected_pk.append([((min(2 * n - 1, k) + 1) // 2) / min(2 * n - 1, k) for k in KAPPAS])
    res = revisited_eval(np.array(rows), gt, KAPPAS)
    np.testing.assert_allclose(res.medium.aps, expected_ap, atol=1e-12, rtol=0)
    np.testing.assert_allclose(res.medium.p_at_k, expected_pk, atol=1e-12, rtol=0)
    assert 0.5 < res.medium.map < 1.0


def _ranking_cases(gt, raw):
    rng = np.random.default_rng(2)
    medium_ok = np.zeros((gt.n_queries, gt.n_db))
    for i, q in enumerate(raw["gnd"]):
        medium_ok[i, list(q["easy"]) + list(q["hard"])] = 1.0
    yield "random", np.stack([rng.permutation(gt.n_db) for _ in range(gt.n_queries)])
    yield "noisy-good", np.argsort(-(rng.normal(size=medium_ok.shape) + 2.5 * medium_ok), axis=1)
    perfect = np.stack([ranking_starting_with(list(q["easy"]) + list(q["hard"]), gt.n_db) for q in raw["gnd"]])
    yield "reversed", perfect[:, ::-1]


@pytest.mark.parametrize("k", [None, 1, 10, 100, 1000])
def test_matches_independent_reference(dataset, k):
    """Full rankings (k None) and top-k lists, where positives outside the top k count as not retrieved,
    as revisitop scores a short list."""
    _, gt, raw = dataset
    setups = raw_setups(raw)
    for case, full_ranks in _ranking_cases(gt, raw):
        ranks = full_ranks[:, :k]
        res = revisited_eval(ranks, gt, KAPPAS)
        full = revisited_eval(full_ranks, gt, KAPPAS)
        for difficulty in ("easy", "medium", "hard"):
            ours = getattr(res, difficulty)
            ref_map, ref_aps, ref_mpr, ref_prs = reference_compute_map(ranks.T, setups[difficulty], KAPPAS)
            where = f"k={k}/{case}/{difficulty}"
            assert abs(ours.map - ref_map) < 1e-12, where
            np.testing.assert_allclose(ours.aps, ref_aps, atol=1e-12, rtol=0, err_msg=where)
            np.testing.assert_allclose(ours.mp_at_k, ref_mpr, atol=1e-12, rtol=0, err_msg=where)
            np.testing.assert_allclose(ours.p_at_k, ref_prs, atol=1e-12, rtol=0, err_msg=where)
            assert ours.map <= getattr(full, difficulty).map + 1e-12, where  # truncation never helps
        if case == "reversed" and k is None:
            assert res.medium.map < 0.05


def test_top_k_scores_as_the_full_ranking_when_every_positive_is_inside(dataset):
    """A top-k list whose k covers every positive and junk of every query gives the full ranking's figures."""
    _, gt, raw = dataset
    rng = np.random.default_rng(5)
    heads = [rng.permutation(list(dict.fromkeys([*q["easy"], *q["hard"], *q["junk"]]))).tolist()
             for q in raw["gnd"]]
    full = np.stack([ranking_starting_with(h, gt.n_db) for h in heads])
    k = max(len(h) for h in heads) + 7
    top_k = full[:, :k]
    assert k < gt.n_db
    a, b = revisited_eval(full, gt, KAPPAS), revisited_eval(top_k, gt, KAPPAS)
    for difficulty in ("easy", "medium", "hard"):
        x, y = getattr(a, difficulty), getattr(b, difficulty)
        assert x.map == y.map
        np.testing.assert_array_equal(x.aps, y.aps)
        np.testing.assert_array_equal(x.p_at_k, y.p_at_k)


def test_revisited_eval_errors_and_summary(dataset):
    name, gt, _ = dataset
    ranks = ranks_from_scores(np.random.default_rng(3).random((gt.n_queries, gt.n_db)))
    with pytest.raises(ValueError, match=r"pass ranks\.T"):
        revisited_eval(ranks.T, gt)
    with pytest.raises(ValueError, match=f"ranks list {gt.n_db + 1} ids per query but {name} has {gt.n_db}"):
        revisited_eval(np.zeros((gt.n_queries, gt.n_db + 1), dtype=np.int64), gt)
    with pytest.raises(ValueError, match=f"holds id {gt.n_db}, out of range for {name}"):
        revisited_eval(np.full((gt.n_queries, 3), gt.n_db), gt)
    with pytest.raises(ValueError, match="more than once"):
        revisited_eval(np.zeros((gt.n_queries, 3), dtype=np.int64), gt)
    res = revisited_eval(ranks, gt)
    text = res.summary()
    pct = lambda x: np.around(x * 100, decimals=2)  # noqa: E731
    assert text.splitlines()[0] == (f">> {name}: mAP E: {pct(res.easy.map)}, M: {pct(res.medium.map)}, "
                                    f"H: {pct(res.hard.map)}")
    assert text.splitlines()[1].startswith(f">> {name}: mP@k[ 1  5 10] E: ")


# ---------------------------------------------------------------------------------------------------------
# ranks_from_scores
# ---------------------------------------------------------------------------------------------------------


def test_ranks_from_scores_descending_with_ties_by_index():
    scores = np.array([[0.1, 0.5, 0.5, -1.0], [3.0, 3.0, 3.0, 3.0]])
    assert ranks_from_scores(scores).tolist() == [[1, 2, 0, 3], [0, 1, 2, 3]]
    assert ranks_from_scores(np.array([[0, 255, 3, 255]], dtype=np.uint8)).tolist() == [[1, 3, 2, 0]]
    rand = np.random.default_rng(4).random((5, 300)).astype(np.float32)
    np.testing.assert_array_equal(ranks_from_scores(rand), np.argsort(-rand, axis=1, kind="stable"))
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores(np.array([[0.1, np.nan]]))
    with pytest.raises(ValueError, match="2-D"):
        ranks_from_scores(np.array([0.1, 0.2]))


# ---------------------------------------------------------------------------------------------------------
# Labelled sets
# ---------------------------------------------------------------------------------------------------------


def unit_circle(degrees):
    a = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def reference_labelled(q, ql, g, gl, exclude_self, ks):
    """Brute force: order by (-score, index), drop self if asked, AP = mean precision at each hit."""
    aps, firsts = [], []
    for i in range(len(q)):
        scores = [float(np.dot(q[i].astype(np.float64), g[j].astype(np.float64))) for j in range(len(g))]
        order = sorted((j for j in range(len(g)) if not (exclude_self and j == i)), key=lambda j: (-scores[j], j))
        hits = [rank for rank, j in enumerate(order) if gl[j] == ql[i]]
        if not hits:
            continue
        aps.append(sum((n + 1) / (rank + 1) for n, rank in enumerate(hits)) / len(hits))
        firsts.append(hits[0])
    return sum(aps) / len(aps), {k: sum(f < k for f in firsts) / len(firsts) for k in ks}


def test_class_map_and_recall_by_hand():
    # gallery at 10..50 degrees, labels A B A B A; queries at 0 degrees, so the order is 10, 20, 30, 40, 50.
    gallery = unit_circle([10, 20, 30, 40, 50])
    g_labels = np.array(["A", "B", "A", "B", "A"])
    queries = unit_circle([0, 0, 0])
    q_labels = np.array(["A", "B", "C"])  # C has no positive: left out
    # A: hits at ranks 0, 2, 4 -> (1/1 + 2/3 + 3/5)/3 = 34/45; B: hits at 1, 3 -> (1/2 + 2/4)/2 = 1/2
    expected = (34 / 45 + 0.5) / 2
    assert class_map(queries, q_labels, gallery, g_labels) == pytest.approx(expected, abs=1e-12)
    recall = recall_at_k(queries, q_labels, gallery, g_labels, ks=(1, 2, 5))
    assert recall == {1: 0.5, 2: 1.0, 5: 1.0}
    res = labelled_eval(queries, q_labels, gallery, g_labels)
    assert res.n_evaluated == 2 and math.isnan(res.aps[2])


def test_exclude_self_leave_one_out_by_hand():
    emb = unit_circle([0, 10, 20])
    labels = np.array([0, 1, 0])
    # leave-one-out: q0 sees [10(B), 20(A)] -> 1/2; q1 has no other B -> out; q2 sees [10(B), 0(A)] -> 1/2
    assert class_map(emb, labels, emb, labels, exclude_self=True) == pytest.approx(0.5, abs=1e-12)
    assert recall_at_k(emb, labels, emb, labels, ks=(1, 2), exclude_self=True) == {1: 0.0, 2: 1.0}
    # self included: q0 [self, B, A] -> (1 + 2/3)/2 = 5/6; q1 [self] -> 1; q2 [self, B, A] -> 5/6
    assert class_map(emb, labels, emb, labels) == pytest.approx((5 / 6 + 1 + 5 / 6) / 3, abs=1e-12)


def test_labelled_metrics_match_brute_force_with_ties():
    """Entries of +-1/4 in 16 dims: norms are exactly 1 and dot products exact, so many exact ties."""
    rng = np.random.default_rng(5)
    base = rng.choice([-0.25, 0.25], size=(12, 16)).astype(np.float32)  # few distinct vectors -> ties
    gallery = base[rng.integers(0, 12, 90)]
    g_labels = rng.integers(0, 5, 90)
    queries = base[rng.integers(0, 12, 40)]
    q_labels = rng.integers(0, 6, 40)  # label 5 never appears in the gallery
    assert (q_labels == 5).any()
    for chunk_size in (1, 7, 1024):
        ours = labelled_eval(queries, q_labels, gallery, g_labels, ks=(1, 3, 10), chunk_size=chunk_size)
        ref_map, ref_recall = reference_labelled(queries, q_labels, gallery, g_labels, False, (1, 3, 10))
        assert ours.map == pytest.approx(ref_map, abs=1e-12)
        assert ours.recall == pytest.approx(ref_recall, abs=1e-12)
        loo = labelled_eval(gallery, g_labels, gallery, g_labels, ks=(1, 5), exclude_self=True, chunk_size=chunk_size)
        ref_map, ref_recall = reference_labelled(gallery, g_labels, gallery, g_labels, True, (1, 5))
        assert loo.map == pytest.approx(ref_map, abs=1e-12)
        assert loo.recall == pytest.approx(ref_recall, abs=1e-12)


def test_labelled_eval_scores_equals_labelled_eval_whole_or_in_chunks():
    """The same ranking loop from a score matrix, or from row blocks of it (re-ranked scores, large sets)."""
    rng = np.random.default_rng(7)
    base = rng.choice([-0.25, 0.25], size=(10, 16)).astype(np.float32)  # exact ties too
    g = base[rng.integers(0, 10, 70)]
    gl = rng.integers(0, 5, 70)
    for q, ql, loo in ((g, gl, True), (base[rng.integers(0, 10, 30)], rng.integers(0, 6, 30), False)):
        want = labelled_eval(q, ql, g, gl, ks=(1, 5), exclude_self=loo)
        scores = q @ g.T
        blocks = ((s, scores[s:s + 7]) for s in range(0, len(q), 7))
        for got in (labelled_eval_scores(scores, ql, gl, ks=(1, 5), exclude_self=loo),
                    labelled_eval_scores(blocks, ql, gl, ks=(1, 5), exclude_self=loo)):
            assert got.map == want.map and got.recall == want.recall
            assert np.array_equal(got.aps, want.aps, equal_nan=True)
    with pytest.raises(ValueError, match="does not continue"):
        labelled_eval_scores([(0, scores[:7]), (14, scores[14:])], ql, gl)
    with pytest.raises(ValueError, match="cover 7 of 30"):
        labelled_eval_scores([(0, scores[:7])], ql, gl)
    with pytest.raises(ValueError, match="expected \\(30, 70\\)"):
        labelled_eval_scores(scores.T, ql, gl)


def test_labelled_metrics_match_brute_force_without_ties():
    rng = np.random.default_rng(6)
    g = rng.normal(size=(150, 24))
    g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
    q = rng.normal(size=(60, 24))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    gl, ql = rng.integers(0, 8, 150), rng.integers(0, 8, 60)
    ours = labelled_eval(q, ql, g, gl, ks=(1, 5, 10))
    ref_map, ref_recall = reference_labelled(q, ql, g, gl, False, (1, 5, 10))
    assert ours.map == pytest.approx(ref_map, abs=1e-12)
    assert ours.recall == pytest.approx(ref_recall, abs=1e-12)


def test_labelled_metrics_errors():
    emb = unit_circle([0, 10, 20])
    labels = np.array([0, 1, 0])
    with pytest.raises(ValueError, match="not L2-normalised"):
        class_map(emb * 2, labels, emb, labels)
    with pytest.raises(ValueError, match="NaN or inf"):
        class_map(np.full((3, 2), np.nan, dtype=np.float32), labels, emb, labels)
    with pytest.raises(ValueError, match=r"one label per embedding \(3\)"):
        class_map(emb, labels[:2], emb, labels)
    with pytest.raises(ValueError, match="exclude_self needs the queries to be the gallery"):
        class_map(emb[:2], labels[:2], emb, labels, exclude_self=True)
    with pytest.raises(ValueError, match="no query has a positive"):
        class_map(emb, np.array([7, 8, 9]), emb, labels)
    with pytest.raises(ValueError, match="ks must be positive integers"):
        recall_at_k(emb, labels, emb, labels, ks=(0,))
    with pytest.raises(ValueError, match="2-D float array"):
        class_map(np.array([1, 0]), labels[:1], emb, labels)


# ---------------------------------------------------------------------------------------------------------
# Asymmetric evaluation
# ---------------------------------------------------------------------------------------------------------


def _normalise(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(rng, n_classes=8, per_class=25, dim=32, noise=0.8):
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    return _normalise(centres[labels] + noise * rng.normal(size=(labels.size, dim))), labels, centres


def test_asymmetric_equal_models_ratio_one_noisy_query_model_lower():
    rng = np.random.default_rng(8)
    gallery, g_labels, centres = _clustered(rng)
    q_labels = np.repeat(np.arange(8), 5)
    query_g = _normalise(centres[q_labels] + 0.8 * rng.normal(size=(q_labels.size, 32)))

    same = asymmetric_eval(query_g, gallery, q_labels, g_labels, query_emb_g=query_g)
    assert same.ratio == 1.0 and same.asym_map == same.sym_map
    assert same.n_queries == 40 and same.dim == 32
    assert 0.0 < same.sym_map < 1.0

    query_q = _normalise(query_g + 0.15 * rng.normal(size=query_g.shape))  # a weaker query model
    noisy = asymmetric_eval(query_q, gallery, q_labels, g_labels, query_emb_g=query_g)
    assert noisy.sym_map == same.sym_map
    assert noisy.asym_map < noisy.sym_map and noisy.ratio < 1.0
    assert noisy.ratio == pytest.approx(noisy.asym_map / noisy.sym_map)
    assert noisy.asym_map == pytest.approx(class_map(query_q, q_labels, gallery, g_labels), abs=1e-15)
    assert noisy.asym_recall_at_1 == recall_at_k(query_q, q_labels, gallery, g_labels, ks=(1,))[1]
    text = noisy.summary()
    assert f"asymmetric mAP {noisy.asym_map * 100:.2f}" in text
    assert f"symmetric mAP {noisy.sym_map * 100:.2f}" in text and f"asym/sym {noisy.ratio:.3f}" in text

    alone = asymmetric_eval(query_q, gallery, q_labels, g_labels)
    assert alone.sym_map is None and alone.ratio is None and "asym/sym" not in alone.summary()


def test_asymmetric_leave_one_out():
    rng = np.random.default_rng(9)
    gallery, labels, _ = _clustered(rng, per_class=10)
    res = asymmetric_eval(gallery, gallery, labels, labels, query_emb_g=gallery, exclude_self=True)
    assert res.ratio == 1.0
    assert res.asym_map == pytest.approx(class_map(gallery, labels, gallery, labels, exclude_self=True), abs=1e-15)
    assert res.asym_map < class_map(gallery, labels, gallery, labels)  # self-match inflates mAP


def test_asymmetric_errors():
    rng = np.random.default_rng(10)
    q = _normalise(rng.normal(size=(4, 128)))
    g = _normalise(rng.normal(size=(6, 256)))
    labels_q, labels_g = np.arange(4), np.arange(6)
    with pytest.raises(ValueError, match="query embedding dim 128 != gallery dim 256: the models are not in one "
                                         "embedding space"):
        asymmetric_eval(q, g, labels_q, labels_g)
    g128 = _normalise(rng.normal(size=(6, 128)))
    with pytest.raises(ValueError, match="query_emb_g has 3 rows but query_emb_q has 4"):
        asymmetric_eval(q, g128, labels_q, labels_g, query_emb_g=q[:3])


def test_module_does_not_import_torch():
    """evaluate.py itself is numpy-only. It is loaded by file path, bypassing the `training` package
    __init__, which imports torch for its timm shim."""
    path = Path(__file__).resolve().parents[2] / "training" / "evaluate.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('evaluate_alone', {str(path)!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "assert hasattr(mod, 'compute_map')\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_format_table_prints_numpy_numbers_and_dashes_the_rest():
    columns = [("map", "mAP", 8, ".2f", 100), ("seconds", "s", 9, ".0f", 1)]
    rows = [{"run": "a", "map": np.float32(0.5), "seconds": np.int64(12)},
            {"run": "b", "map": None, "seconds": 3.0, "resumed": True}]
    lines = format_table(rows, columns, "run", 4).splitlines()
    assert lines[1].split() == ["a", "50.00", "12"]
    assert lines[2].split() == ["b", "-", "resumed"]
