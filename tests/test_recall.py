"""The recall example's smoke size runs end to end on the CPU (every mixer, a few steps)."""
import torch

from ssm_kernels.examples import recall


def test_mqar_batch_is_well_formed():
    tokens, labels = recall.mqar_batch(3, 40, 5, 64, "cpu", torch.Generator().manual_seed(0))
    assert tokens.shape == labels.shape == (3, 40)
    for b in range(3):
        kv = dict(zip(tokens[b, 0:10:2].tolist(), tokens[b, 1:10:2].tolist()))
        assert len(kv) == 5 and all(0 < k < 32 <= v < 64 for k, v in kv.items())
        q = (labels[b] != -100).nonzero().flatten().tolist()
        assert len(q) == 5 and min(q) >= 10
        for p in q:  # every query asks a key of this sequence; the label is its value
            assert kv[tokens[b, p].item()] == labels[b, p].item()


def test_tiny_run(tmp_path):
    rows = recall.main(["--tiny", "--out", str(tmp_path)])
    assert {r["mixer"] for r in rows} == set(recall.MIXERS)
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["state_bytes"] > 0 for r in rows)
    assert (tmp_path / "recall.csv").exists()
