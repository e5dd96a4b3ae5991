"""`make demo`'s job at a quarter of its steps: all three phases run and held-out PSNR rises by >= 5 dB."""
from dcae.demo import main


def test_demo_trains_three_phases(tmp_path):
    table = main(["--out", str(tmp_path / "demo"), "--scale", "0.25"])
    assert list(table) == ["untrained", "after phase 1", "after phase 2", "after phase 3"]
    assert table["after phase 3"]["psnr"] - table["untrained"]["psnr"] >= 5.0
    for name in ("reconstructions.png", "summary.json", "phase1/loss.png", "phase3/loss.png", "phase3/model"):
        assert (tmp_path / "demo" / name).exists(), name
