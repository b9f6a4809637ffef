"""The fault-injection tool: kills a real training (the tiny DiT) at random moments and during saves, resumes it,
and finds every loss equal to the uninterrupted run's; its comparison catches a difference."""
from tools.fault_inject import compare, fault_inject
from test_t2v_train import make_t2v_assets


def test_compare_finds_a_changed_loss_a_missing_end_and_an_unknown_step():
    reference = [(1, {"loss": 1.0}), (2, {"loss": 0.5}), (3, {"loss": 0.25})]
    assert compare(reference, [(1, {"loss": 1.0}), (2, {"loss": 0.5}), (2, {"loss": 0.5}), (3, {"loss": 0.25})],
                   0.0) == []
    problems = compare(reference, [(1, {"loss": 1.0}), (2, {"loss": 0.5000001}), (4, {"loss": 0.1})], 0.0)
    assert any("step 2 loss" in p for p in problems) and any("step 4" in p for p in problems)
    assert any("ended at step 4" in p for p in problems)
    assert compare(reference, [(1, {"loss": 1.0}), (2, {"loss": 0.5000001}), (3, {"loss": 0.25})], 1e-5) == []


def test_the_tiny_dit_survives_kills_during_steps_and_saves_exactly(tmp_path):
    config = make_t2v_assets(tmp_path / "assets")
    report = fault_inject("dit.train", str(config), ["run.max_steps=10", "run.eval_every=0", "run.ema_decay=0.9"],
                          tmp_path / "work", kills=2, seed=1, save_every=2)
    assert report["equal"], report["problems"]
    assert len([e for e in report["kills"] if "skipped" not in e]) >= 1
    assert report["reference_steps"] == 10
