"""Evaluation metrics: hand-computed cases, brute-force cross-checks, and a real 2-rank gloo merge."""

import datetime
import math
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from features.schema import load_schema
from trainer.distributed import exit_rank
from trainer.metrics import EvalAccumulator, binary_metrics, clustered_mean, event_log_loss, format_table

TASKS = load_schema("feed").label_columns


def brute_force_auc(pred, label):
    """Every (positive, negative) pair: a win counts 1, a tie 1/2."""
    pos, neg = pred[label == 1], pred[label == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def entropy(rate):
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


def test_base_rate_predictor_has_ne_exactly_one():
    label = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0, 0], dtype=float)
    metrics = binary_metrics(np.full(label.size, 0.3), label)
    assert metrics["ne"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["base_rate"] == pytest.approx(0.3)
    assert metrics["calibration"] == pytest.approx(1.0)
    assert metrics["count"] == 10


def test_log_loss_and_ne_match_the_direct_formula():
    pred = np.array([0.9, 0.2, 0.6, 0.05, 0.5])
    label = np.array([1, 0, 0, 1, 1], dtype=float)
    direct = -np.mean([math.log(0.9), math.log(0.8), math.log(0.4), math.log(0.05), math.log(0.5)])
    metrics = binary_metrics(pred, label)
    assert metrics["log_loss"] == pytest.approx(direct, rel=1e-12)
    assert metrics["ne"] == pytest.approx(direct / entropy(0.6), rel=1e-12)


def test_log_loss_clips_certain_wrong_predictions():
    metrics = binary_metrics(np.array([0.0, 1.0]), np.array([1.0, 0.0]))
    assert metrics["log_loss"] == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_calibration_ratio_is_mean_prediction_over_mean_label():
    metrics = binary_metrics(np.array([0.2, 0.4, 0.6, 0.8]), np.array([0, 0, 0, 1], dtype=float))
    assert metrics["mean_pred"] == pytest.approx(0.5)
    assert metrics["calibration"] == pytest.approx(0.5 / 0.25)


@pytest.mark.parametrize("pred, expected", [
    ([0.1, 0.2, 0.8, 0.9], 1.0),    # perfect
    ([0.9, 0.8, 0.2, 0.1], 0.0),    # reversed
    ([0.5, 0.5, 0.5, 0.5], 0.5),    # all tied
])
def test_auc_extremes(pred, expected):
    assert binary_metrics(np.array(pred), np.array([0, 0, 1, 1], dtype=float))["auc"] == expected


def test_auc_with_ties_matches_pairwise_count():
    pred = np.array([0.3, 0.3, 0.7, 0.7, 0.7, 0.1, 0.9, 0.3])
    label = np.array([1, 0, 1, 0, 0, 0, 1, 1], dtype=float)
    # Positives 0.3, 0.7, 0.9, 0.3 against negatives 0.3, 0.7, 0.7, 0.1:
    # 0.3 -> 1 win + 1 tie; 0.7 -> 2 wins + 2 ties; 0.9 -> 4 wins; 0.3 -> 1 win + 1 tie.
    hand = (1 + 0.5 + 2 + 1 + 4 + 1 + 0.5) / 16
    assert binary_metrics(pred, label)["auc"] == pytest.approx(hand, abs=1e-15)
    assert hand == pytest.approx(brute_force_auc(pred, label), abs=1e-15)


def test_auc_on_random_data_matches_brute_force():
    rng = np.random.default_rng(7)
    pred = rng.integers(0, 50, 3000) / 50.0  # coarse grid: many ties
    label = (rng.random(pred.size) < pred).astype(float)
    assert binary_metrics(pred, label)["auc"] == pytest.approx(brute_force_auc(pred, label), abs=1e-12)


def test_gauc_is_impression_weighted_over_users_with_both_classes():
    user = np.array([7, 7, 7, 7, 3, 3, 3, 9, 9], dtype=np.int64)
    pred = np.array([0.1, 0.4, 0.35, 0.8, 0.6, 0.2, 0.5, 0.9, 0.1])
    label = np.array([0, 0, 1, 1, 0, 1, 1, 1, 1], dtype=float)
    # user 7: positives 0.35, 0.8 vs negatives 0.1, 0.4 -> 3 of 4 pairs; user 3: positives 0.2, 0.5
    # vs negative 0.6 -> 0 of 2; user 9 has no negative and is left out.
    hand = (4 * 0.75 + 3 * 0.0) / (4 + 3)
    metrics = binary_metrics(pred, label, user)
    assert metrics["gauc"] == pytest.approx(hand, abs=1e-15)
    assert math.isnan(binary_metrics(pred, label)["gauc"])  # no user ids given


def test_gauc_on_random_users_matches_per_user_brute_force():
    rng = np.random.default_rng(11)
    user = rng.integers(0, 40, 2000) * 1_000_000_007  # large, sparse keys like the 60-bit hashes
    pred = rng.integers(0, 20, user.size) / 20.0
    label = (rng.random(user.size) < pred).astype(float)
    weighted, total = 0.0, 0
    for key in np.unique(user):
        mine = user == key
        if 0 < label[mine].sum() < mine.sum():
            weighted += mine.sum() * brute_force_auc(pred[mine], label[mine])
            total += mine.sum()
    assert binary_metrics(pred, label, user)["gauc"] == pytest.approx(weighted / total, abs=1e-12)


def test_ece_of_a_calibrated_predictor_is_near_zero():
    rng = np.random.default_rng(3)
    pred = rng.random(400_000)
    label = (rng.random(pred.size) < pred).astype(float)
    assert binary_metrics(pred, label)["ece"] < 0.005
    assert binary_metrics(np.clip(pred + 0.1, 0, 1), label)["ece"] > 0.05


def test_ece_of_a_constant_offset_predictor_equals_the_offset():
    # Ten groups at bin centres (k + 0.5) / 10 with exactly that share of positives.
    centres = (np.arange(10) + 0.5) / 10
    pred = np.repeat(centres, 20)
    label = np.concatenate([np.r_[np.ones(2 * k + 1), np.zeros(19 - 2 * k)] for k in range(10)])
    assert binary_metrics(pred, label, bins=10)["ece"] == pytest.approx(0.0, abs=1e-12)
    assert binary_metrics(pred + 0.03, label, bins=10)["ece"] == pytest.approx(0.03, abs=1e-12)


def test_ece_last_bin_is_closed():
    metrics = binary_metrics(np.array([1.0, 1.0]), np.array([1.0, 0.0]), bins=4)
    assert metrics["ece"] == pytest.approx(0.5)


def test_undefined_metrics_are_nan():
    one_class = binary_metrics(np.array([0.2, 0.7]), np.array([1.0, 1.0]), np.array([1, 1]))
    assert all(math.isnan(one_class[key]) for key in ("ne", "auc", "gauc"))
    assert one_class["calibration"] == pytest.approx(0.45)
    empty = binary_metrics(np.zeros(0), np.zeros(0))
    assert empty["count"] == 0
    assert all(math.isnan(value) for key, value in empty.items() if key != "count")


@pytest.mark.parametrize("pred, label, message", [
    ([0.1, 0.2], [1.0], "shape"),
    ([0.1, 1.2], [1.0, 0.0], "probabilities"),
    ([0.1, math.nan], [1.0, 0.0], "probabilities"),
    ([0.1, 0.2], [1.0, 0.5], "0 or 1"),
])
def test_bad_input_is_rejected_clearly(pred, label, message):
    with pytest.raises(ValueError, match=message):
        binary_metrics(np.array(pred), np.array(label))


def random_batches(seed, batches=3, rows=6, context=5):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        probs = {task: torch.from_numpy(rng.random((rows, context), dtype=np.float32)) for task in TASKS}
        labels = {task: torch.from_numpy(rng.random((rows, context)) < probs[task].numpy()).float()
                  for task in TASKS}
        mask = torch.from_numpy((rng.random((rows, context)) < 0.7).astype(np.float32))
        user_key = torch.from_numpy(rng.integers(0, 4, rows) * (1 << 59) + rng.integers(0, 3, rows))
        out.append((probs, labels, mask, user_key))
    return out


def test_accumulator_keeps_masked_tokens_and_merge_equals_one_pass():
    batches = random_batches(seed=1)
    whole, first, second = EvalAccumulator(TASKS), EvalAccumulator(TASKS), EvalAccumulator(TASKS)
    for index, batch in enumerate(batches):
        whole.add(*batch)
        (first if index < 1 else second).add(*batch)
    mask_total = int(sum(batch[2].sum() for batch in batches))
    assert len(whole) == mask_total
    merged = first.merge(second)
    assert len(first) + len(second) == len(merged) == mask_total
    assert merged.compute() == whole.compute()

    probs, labels, mask, user_key = batches[0]
    keep = mask.numpy() == 1
    users = np.broadcast_to(user_key.numpy()[:, None], keep.shape)[keep]
    single = EvalAccumulator(TASKS)
    single.add(probs, labels, mask, user_key)
    direct = binary_metrics(probs["like"].double().numpy()[keep], labels["like"].numpy()[keep], users)
    assert single.compute()["like"] == direct


def test_gather_without_a_process_group_is_a_no_op():
    accumulator = EvalAccumulator(TASKS)
    accumulator.add(*random_batches(seed=2, batches=1)[0])
    assert accumulator.gather() is accumulator


def test_accumulator_rejects_bad_batches():
    probs, labels, mask, user_key = random_batches(seed=3, batches=1)[0]
    accumulator = EvalAccumulator(TASKS)
    with pytest.raises(ValueError, match="missing"):
        accumulator.add({"like": probs["like"]}, labels, mask, user_key)
    with pytest.raises(ValueError, match="user_key"):
        accumulator.add(probs, labels, mask, user_key[:-1])
    with pytest.raises(ValueError, match="0 and 1"):
        accumulator.add(probs, labels, mask * 0.5, user_key)
    assert len(accumulator) == 0  # a rejected batch leaves nothing behind


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gather_worker(rank, world, port, scenarios, out_dir):
    """One gloo rank: for each scenario, add this rank's batches, gather, compute."""
    # A short timeout: a failing rank must fail the test, not leave its peer waiting for 30 minutes.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = []
        for per_rank_batches in scenarios:
            accumulator = EvalAccumulator(TASKS)
            for batch in per_rank_batches[rank]:
                accumulator.add(*batch)
            gathered = accumulator.gather()
            results.append((len(accumulator), len(gathered), gathered.compute()))
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as handle:
            pickle.dump(results, handle)
    finally:
        dist.destroy_process_group()
    exit_rank(0)


def test_two_gloo_ranks_equal_one_process(tmp_path):
    batches = random_batches(seed=5, batches=4)
    empty = [(probs, labels, torch.zeros_like(mask), user_key)
             for probs, labels, mask, user_key in random_batches(seed=6, batches=1)]
    scenarios = [
        [batches[:1], batches[1:]],  # uneven split; users appear on both ranks
        [batches, empty],            # rank 1 has batches but no label-bearing token
        [empty, []],                 # no token anywhere
    ]
    mp.spawn(gather_worker, args=(2, free_port(), scenarios, str(tmp_path)), nprocs=2, join=True)

    for rank in range(2):
        results = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        for (local_count, gathered_count, metrics), per_rank_batches in zip(results, scenarios):
            single = EvalAccumulator(TASKS)
            for batch in per_rank_batches[0] + per_rank_batches[1]:
                single.add(*batch)
            assert local_count == sum(int(b[2].sum()) for b in per_rank_batches[rank])
            assert gathered_count == len(single)
            expected = single.compute()
            for task in TASKS:
                for key, value in expected[task].items():
                    assert metrics[task][key] == pytest.approx(value, rel=1e-12, abs=1e-15, nan_ok=True), (
                        rank, task, key)
        assert results[0][2]["like"]["count"] > 0 and not math.isnan(results[0][2]["like"]["gauc"])
        assert results[2][2]["like"]["count"] == 0


def test_format_table_lists_every_run_and_task_with_relative_ne():
    metrics = binary_metrics(np.array([0.2, 0.7, 0.4]), np.array([0.0, 1.0, 1.0]))
    baseline = {task: dict(metrics) for task in TASKS}
    variant = {task: dict(metrics, ne=metrics["ne"] * 0.99) for task, metrics in baseline.items()}
    text = format_table({"ordinal": baseline, "siren-rope": variant})
    lines = text.splitlines()
    assert lines[0].split() == ["run", "task", "NE", "AUC", "GAUC", "ECE", "calib", "ΔNE%", "count"]
    assert len(lines) == 2 + 2 * len(TASKS)
    assert len({len(line) for line in lines[1:]}) == 1  # fixed width
    assert "-1.00" in lines[-1] and "+0.00" in lines[2]
    assert f"{baseline['like']['auc']:.4f}" in text
    assert "n/a" in text  # GAUC without users
    assert "ΔNE%" not in format_table({"ordinal": baseline})


def test_event_log_loss_terms_average_to_the_log_loss():
    rng = np.random.default_rng(5)
    pred, label = rng.random(200), (rng.random(200) < 0.3).astype(float)
    pred[:2] = [0.0, 1.0]  # clipped like the mean
    terms = event_log_loss(pred, label)
    assert terms.shape == (200,) and (terms > 0).all()
    assert terms[5] == pytest.approx(-math.log(pred[5]) if label[5] else -math.log(1 - pred[5]), rel=1e-12)
    assert terms.mean() == binary_metrics(pred, label)["log_loss"]


def test_clustered_mean_matches_the_formula_by_hand():
    values = np.array([1.0, 3.0, 2.0, 6.0, 0.0])
    cluster = np.array([7, 7, 9, 9, 4])
    mean = 12.0 / 5
    residual_sums = [(1 - mean) + (3 - mean), (2 - mean) + (6 - mean), 0 - mean]
    expected = math.sqrt(3 / 2 * sum(value ** 2 for value in residual_sums) / 5 ** 2)
    assert clustered_mean(values, cluster) == pytest.approx((mean, expected), rel=1e-12)


def test_clustered_standard_error_counts_users_not_events():
    """Singleton clusters give the usual standard error; one value repeated for all of a user's
    events is as uncertain as one event per user, however many events there are."""
    rng = np.random.default_rng(6)
    per_user = rng.normal(size=50)
    _, singleton_se = clustered_mean(per_user, np.arange(50))
    assert singleton_se == pytest.approx(per_user.std(ddof=1) / math.sqrt(50), rel=1e-12)
    repeated_mean, repeated_se = clustered_mean(np.repeat(per_user, 40), np.repeat(np.arange(50), 40))
    assert repeated_mean == pytest.approx(per_user.mean()) and repeated_se == pytest.approx(singleton_se)
    assert math.isnan(clustered_mean(np.ones(3), np.zeros(3))[1])
    assert all(math.isnan(value) for value in clustered_mean(np.zeros(0), np.zeros(0)))


def test_accumulator_tokens_are_the_kept_tokens_in_order():
    accumulator = EvalAccumulator(("contribution",))
    accumulator.add({"contribution": np.array([[0.2, 0.4], [0.6, 0.8]])},
                    {"contribution": np.array([[0.0, 1.0], [1.0, 0.0]])}, np.array([[1.0, 0.0], [1.0, 1.0]]),
                    np.array([11, 12]))
    pred, label, user = accumulator.tokens("contribution")
    assert pred.tolist() == [0.2, 0.6, 0.8] and label.tolist() == [0.0, 1.0, 0.0] and user.tolist() == [11, 12, 12]
