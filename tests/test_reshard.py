"""Resume at another data-parallel size (gloo, CPU): a tiny DiT trained on 2 ranks, resumed on 1 rank with 2
accumulation steps (the same global batch), then on 2 ranks again, equals the uninterrupted 1-rank run: every logged
loss and the exported EMA weights, under ZeRO 2 and 3. DeepSpeed's universal checkpoint re-partitions the
optimizer states (``infra.reshard``); the data order and draws follow the global batch index."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

from multinode_helpers import run_nodes
from test_t2v_parallel import COMMON as PARALLEL_COMMON, _train
from test_t2v_train import logged_losses, make_t2v_assets

STEPS = 6
# Small batches, two checkpoints on the way; no sampling (the exported weights stand for the model). ZeRO-3's
# persistence threshold 0 makes it partition even the tiny DiT's parameters (by default it keeps small ones whole,
# and partitioning would never be exercised).
COMMON = ["run.max_steps=6", "run.save_every=2", "run.eval_every=0", "sampling.enabled=false",
          "data.video_batch_size=2", "deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return make_t2v_assets(tmp_path_factory.mktemp("reshard"))


@pytest.fixture(scope="module")
def uninterrupted(config):
    """1 rank, 2 accumulation steps: the global batch of 2 ranks."""
    return _train(config, config.parent / "one_rank", *COMMON, "deepspeed.gradient_accumulation_steps=2")


def exported(run):
    return load_file(str(next((run / "dit").glob("*.safetensors"))))


@pytest.fixture(scope="module")
def two_rank_start(config, tmp_path_factory):
    """``two_rank_start(zero)``: a run folder of 2 ranks under that ZeRO stage stopped at step 2, made once per stage;
    the tests below resume copies of it."""
    made = {}

    def run_for(zero: int):
        if zero not in made:
            made[zero] = tmp_path_factory.mktemp(f"two_ranks_zero{zero}") / "run"
            _train(config, made[zero], *COMMON, f"deepspeed.zero_stage={zero}", "run.stop_after=2", nproc=2)
        return made[zero]

    return run_for


# ZeRO 2 and 3 (43 s each): ZeRO 1 is ZeRO 2's optimizer class and checkpoint layout (DeepSpeed's stage_1_and_2.py,
# the same files and universal conversion), and the VAE's resume across world sizes is tested apart.
@pytest.mark.parametrize("zero", [2, 3])
def test_resume_on_fewer_then_more_ranks_equals_uninterrupted(config, uninterrupted, two_rank_start, tmp_path, zero):
    run, stage = tmp_path / "run", f"deepspeed.zero_stage={zero}"
    shutil.copytree(two_rank_start(zero), run)
    assert (run / "checkpoints/step_000002/dit").is_dir()
    _train(config, run, *COMMON, stage, "run.stop_after=4", "deepspeed.gradient_accumulation_steps=2")  # 2 -> 1
    _train(config, run, *COMMON, stage, nproc=2)  # 1 -> 2
    # Each change converted the checkpoint it resumed from once (2 ranks -> 1 at step 2, 1 -> 2 at step 4).
    assert (run / "checkpoints/universal/step_000002/dit/COMPLETE").is_file()
    assert (run / "checkpoints/universal/step_000004/dit/COMPLETE").is_file()
    ours, theirs = logged_losses(run), logged_losses(uninterrupted)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    for step in theirs:  # float round-off of the reductions only (measured: 1e-7)
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5), (step, ours, theirs)
    assert len(set(theirs.values())) == STEPS
    ours, theirs = exported(run), exported(uninterrupted)  # the EMA weights (decay 0.9) after step 6
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_checkpoint_that_cannot_be_repartitioned_says_so(config, two_rank_start, tmp_path):
    """A checkpoint that verifies but cannot be loaded at this data-parallel size is named as such (not as a
    damaged one), with what to do, and training does not fall back to an older checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(two_rank_start(2), run)
    # Pose as a tensor-parallel checkpoint (optimizer partitions of a second model-parallel rank), which the
    # universal conversion here does not re-partition. The manifest still verifies: it lists only the files saved.
    engine = run / "checkpoints/step_000002/dit"
    for path in list(engine.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")):
        shutil.copy(path, path.with_name(path.name.replace("mp_rank_00", "mp_rank_01")))
    with pytest.raises(AssertionError) as failure:
        _train(config, run, *COMMON, "deepspeed.gradient_accumulation_steps=2")
    message = str(failure.value)
    assert "the checkpoint verifies, but it was written by 2 data-parallel ranks and this run has 1" in message
    assert "Resume with 2 data-parallel ranks" in message and "tensor parallelism" in message
    assert "does not verify" not in message and "no checkpoint can be resumed" not in message


def test_two_node_agents_train_the_dit_like_one_node(config, uninterrupted, tmp_path):
    """torchrun --nnodes 2 (c10d rendezvous on 127.0.0.1, one rank per node agent) trains the tiny DiT as 2 ranks on
    one node do, hence as the 1-rank run with the same global batch."""
    run = tmp_path / "two_nodes"
    run_nodes(["-m", "dit.train", "--config", str(config), f"run.output_dir={run}", *PARALLEL_COMMON, *COMMON])
    ours, theirs = logged_losses(run), logged_losses(uninterrupted)
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in theirs:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5), (step, ours, theirs)
