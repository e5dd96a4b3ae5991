"""`make demo`'s job, its DC-AE half at 15% of its steps: all three phases raise held-out PSNR by >= 5 dB; and
its diffusion half, whose guided digits are read as their class far more often than chance (10%)."""
from dcae.demo import main


def test_demo_runs_both_halves(tmp_path):
    summary = main(["--out", str(tmp_path / "demo"), "--scale", "0.15", "--diffusion-scale", "1"])
    table = summary["autoencoder"]
    assert list(table) == ["untrained", "after phase 1", "after phase 2", "after phase 3"]
    assert table["after phase 3"]["psnr"] - table["untrained"]["psnr"] >= 5.0
    accuracy = summary["diffusion"]["accuracy"]
    assert accuracy["guidance 3"] >= 0.4, accuracy
    assert summary["diffusion"]["classifier_real_accuracy"] >= 0.95
    for name in ("reconstructions.png", "digits-samples.png", "summary.json", "phase1/loss.png", "phase3/model",
                 "digits-ae/model", "digits-latents/meta.json", "digits-dit/model/diffusion.json",
                 "digits-dit/loss.png"):
        assert (tmp_path / "demo" / name).exists(), name
