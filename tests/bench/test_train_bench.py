"""`python -m csrc_bench train --smoke`: the training benchmark's whole path on CPU (tiny preset, fp32, the
reference ops), its files, phase 2's freezing, the batch fallbacks of the GPU plan, and its table arithmetic."""
import json

import pytest
import torch

from csrc_bench.train import (GPU, SMOKE, build_trainer, failed, graph_probe, markdown, peak_gb, run_cases,
                              targets)
from csrc_bench.train import main as train_main
from dcae import DCAE
from dcae.train.phases import trainable_modules
from dcae.train.runfolder import RunFolder

pytest.importorskip("diffusers")  # the dev extra has it; the GPU machine only when .whl/ is carried


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    # The ops' own tests cover the Triton kernels; under the interpreter these runs would take minutes.
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "reference")


def test_smoke_run_writes_rows_table_and_chart(tmp_path, capsys):
    assert train_main(["--smoke", "--out", str(tmp_path)]) == 0
    [json_path] = tmp_path.glob("*-cpu-smoke-train.json")
    data = json.loads(json_path.read_text())
    rows = {(r["part"], r["provider"], r["trains"]): r for r in data["rows"]}
    assert data["meta"]["diffusers"] and data["meta"]["preset"] == SMOKE.preset and data["meta"]["lpips"]
    assert set(rows) == {("phase 1", "diffusers", "all"), ("phase 1", "ours", "all"), ("phase 2", "ours", "all"),
                         ("phase 2", "ours", "phase 2"), ("phase 2", "ours", "phase 2 +ckpt")}
    assert not [r["error"] for r in rows.values() if r["error"]]
    (side1, [batch1]), (side2, [batch2]) = SMOKE.phase1, SMOKE.phase2
    for (part, _, _), r in rows.items():
        assert (r["shape"], r["batch"]) == ((f"{side1}px", batch1) if part == "phase 1" else (f"{side2}px", batch2))
        assert r["images_per_s"] > 0 and r["ms"] > 0 and r["state_gb"] > 0 and r["saved_gb"] > r["loss_saved_gb"] > 0
        assert r["peak_gb"] is None and r["reserved_gb"] is None  # CUDA's figure: n/a on CPU
        assert r["frozen_grads"] == 0 and r["trainable_m"] == r["optimizer_m"]
    # Same weights and images, fp32: ours' first-step loss is diffusers'.
    assert rows["phase 1", "ours", "all"]["loss"] == pytest.approx(rows["phase 1", "diffusers", "all"]["loss"],
                                                                     rel=1e-5)
    full, frozen = rows["phase 2", "ours", "all"], rows["phase 2", "ours", "phase 2"]
    assert full["graph_from"].startswith("encoder.conv_in")
    deepest = len(DCAE.from_config(SMOKE.preset).encoder.down_blocks) - 1
    assert frozen["graph_from"].startswith(f"encoder.down_blocks.{deepest}.")  # the frozen front builds no graph
    assert frozen["trainable_m"] < full["trainable_m"]
    assert frozen["saved_gb"] < full["saved_gb"] and frozen["state_gb"] < full["state_gb"]
    md = json_path.with_suffix(".md").read_text()
    assert "| phase 2 | 128px | 2 | ours | phase 2 |" in md and "## Targets" in md
    assert "- n/a: phase 2 128px: peak memory training the middle layers <= 0.55 x training everything, B2: peak " \
           "not measured on cpu (smoke); estimate (state + saved for backward)" in md
    assert json_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "written:" in out and "graph from encoder.down_blocks" in out


@pytest.fixture
def one_thread():
    # as a smoke run (common.end_to_end_process): at these sizes more threads only contend on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_phase2_step_trains_only_the_middle_layers(tmp_path, one_thread):
    torch.manual_seed(0)
    source = DCAE.from_config(SMOKE.preset)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    trainer = build_trainer(source, "ours", "phase 2", x, tmp_path, SMOKE, lpips=False)
    model = trainer.model
    assert model is not source and model.config == source.config  # a fresh copy
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for m in trainable_modules(model, 2).values() for p in m.parameters()}
    assert in_optimizer == trainable == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(trainable) < len(list(model.parameters()))
    # The encoder's frozen front runs without building a graph: nothing before it needs grad.
    h = model.encoder.conv_in(x)
    for stage in model.encoder.down_blocks[:-1]:
        h = stage(h)
    assert not h.requires_grad and h.grad_fn is None
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    with graph_probe(model, set()) as probe:
        parts = trainer.train_step([x])
    trainer.close()
    RunFolder(tmp_path).acquire()  # close() released the run folder's lock
    assert trainer.step == 1 and set(parts) == {"l1", "rec"}  # L1 only: lpips=False
    # the part phase 2 names "encoder.stages.<deepest>" is the module the graph probe names encoder.down_blocks.<n>
    assert trainable_modules(model, 2)[f"encoder.stages.{model.deepest_stage}"] is model.encoder.down_blocks[-1]
    assert probe["first"].startswith(f"encoder.down_blocks.{len(model.encoder.down_blocks) - 1}.")
    assert probe["loss"] and probe["loss"] < set(probe["saved"])  # the loss saves (x_rec - x) for abs
    for name, p in model.named_parameters():
        assert p.grad is None, name  # frozen: never computed; trainable: zero_grad(set_to_none=True)
        assert torch.equal(p, before[name]) != (id(p) in trainable), name  # only the trainable ones moved
    frozen_bn = [name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert frozen_bn and all(torch.equal(model.state_dict()[f"{name}.running_mean"], before[f"{name}.running_mean"])
                             for name in frozen_bn)  # set_train_mode: frozen BatchNorms keep their statistics
    with pytest.raises(ValueError, match="only our eager model has phase-2 freezing, not diffusers"):
        build_trainer(source, "diffusers", "phase 2", x, tmp_path / "other", SMOKE)


def test_without_gpu_says_so_and_fails(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_main([]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert peak_gb("cpu") == (None, None)


class FakeRun:
    """Records the cases `run_cases` asks for; those in ``ooms`` (part, provider, trains, batch) run out of
    memory."""

    def __init__(self, ooms):
        self.plan, self.ooms, self.calls = GPU, ooms, []

    def case(self, part, provider, trains, side, batch):
        self.calls.append((part, provider, trains, side, batch))
        oom = (part, provider, trains, batch) in self.ooms
        return dict(error="OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" if oom else None)


def test_gpu_plan_falls_back_to_smaller_batches_on_oom():
    run = FakeRun({("phase 1", "ours", "all", 32), ("phase 2", "ours", "all", 8)})
    run_cases(run, compile_=True)
    assert run.calls == [("phase 1", "diffusers", "all", 256, 32), ("phase 1", "ours", "all", 256, 32),
                         ("phase 1", "diffusers", "all", 256, 16), ("phase 1", "ours", "all", 256, 16),
                         ("phase 2", "ours", "all", 1024, 8), ("phase 2", "ours", "all", 1024, 4),
                         ("phase 2", "ours", "phase 2", 1024, 4), ("phase 2", "ours", "phase 2 +ckpt", 1024, 4),
                         ("phase 1", "diffusers-compile", "all", 256, 16), ("phase 1", "ours-compile", "all", 256, 16)]
    assert not failed(dict(error="OutOfMemoryError: ...")) and not failed(dict(error="skipped: budget"))
    assert failed(dict(error="RuntimeError: boom")) and not failed(dict(error=None))


def row(provider, trains, batch, ms=None, part="phase 1", peak_gb=None, error=None, shape="256px"):
    return dict(part=part, provider=provider, trains=trains, shape=shape, batch=batch,
                images_per_s=batch * 1e3 / ms if ms else None, ms=ms, peak_gb=peak_gb, reserved_gb=None,
                state_gb=1.0, saved_gb=2.0, loss_saved_gb=0.5, trainable_m=300.0, optimizer_m=300.0, frozen_grads=0,
                graph_from="encoder.conv_in", loss=0.5, compile_s=None, wall_s=10.0, error=error, gpu="NVIDIA H100")


def test_targets_and_table():
    oom = "OutOfMemoryError: CUDA out of memory"
    rows = [row("diffusers", "all", 32, error=oom), row("ours", "all", 32, error=oom),
            row("diffusers", "all", 16, 1000.0, peak_gb=60.0), row("ours", "all", 16, 625.0, peak_gb=40.0),
            row("ours", "all", 8, part="phase 2", shape="1024px", error=oom),
            row("ours", "all", 4, 2000.0, part="phase 2", shape="1024px", peak_gb=70.0),
            row("ours", "phase 2", 4, 1000.0, part="phase 2", shape="1024px", peak_gb=35.0),
            row("ours", "phase 2 +ckpt", 4, 800.0, part="phase 2", shape="1024px", peak_gb=21.0),
            row("diffusers-compile", "all", 16, error="skipped: would end past the run's time budget"),
            row("ours-compile", "all", 16, error="skipped: would end past the run's time budget")]
    met = {what: ok for ok, what in targets(rows, GPU)}
    assert met == {
        "phase 1 256px B16 (B32 did not fit, see the errors): ours 25.60 img/s >= 1.2 x diffusers 16.00 img/s (x1.60); "
        "peak 40.00 vs 60.00 GB": True,
        "phase 1 256px: ours-compile vs diffusers-compile images/s: not both measured at one batch": None,
        "phase 2 1024px: peak memory training the middle layers <= 0.55 x training everything, B4: 35.00 / 70.00 GB "
        "= 0.500": True,
        "phase 2 1024px with gradient checkpointing: peak memory training the middle layers <= 0.55 x training "
        "everything, B4: 21.00 / 70.00 GB = 0.300": True}
    meta = dict(preset="p", gpu="NVIDIA H100", date="2026-11-26", torch="2.11", triton="3.6", diffusers="0.42",
                backend="triton", dtype="bfloat16", params=323e6, loss="L1 + LPIPS")
    md = markdown(rows, meta, GPU)
    assert "| phase 1 | 256px | 16 | ours | all | 25.60 | 625.0 | 40.00 |" in md and "| 1.60 |  |" in md
    assert "| phase 2 | 1024px | 4 | ours | phase 2 | 4.00 | 1000.0 | 35.00 |" in md and "|  | 0.500 |" in md
    assert "- MET: phase 2 1024px" in md and "- n/a: phase 1 256px: ours-compile" in md
    assert targets(rows[:2], GPU)[0] == (False, "phase 1 256px: ours vs diffusers images/s: not both measured at "
                                                "one batch")
