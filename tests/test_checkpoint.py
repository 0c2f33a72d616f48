import pickle

import pytest
import torch

import vitlab
from vitlab.checkpoint import load_state, save_state


def small():
    return vitlab.create_model("vit_mu4_32px", depth=1, width=32, mlp_dim=64, num_heads=2, num_classes=3)


def test_save_and_load_round_trip(tmp_path):
    model = small()
    torch.nn.init.normal_(model.head.weight)
    path = vitlab.save_model(model, tmp_path / "m.safetensors", class_names=["a", "b", "c"], meta={"top1": 0.5})
    loaded = vitlab.load_model(path)
    assert loaded.class_names == ["a", "b", "c"] and loaded.meta == {"top1": 0.5}
    assert loaded.config == model.cfg
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.model(x), model.eval()(x))
    assert not list(tmp_path.glob("*.tmp"))  # atomic: no temporary left behind


def test_wrong_path_and_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vitlab.load_model(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="corrupted or truncated"):
        vitlab.load_model(bad)
    good = vitlab.save_model(small(), tmp_path / "good.safetensors")
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        vitlab.load_model(truncated)


def test_checkpoint_of_another_architecture(tmp_path):
    from vitlab.checkpoint import load_state_dict_checked

    other = vitlab.create_model("vit_mu4_32px", depth=1, width=64, mlp_dim=64, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match=r"cls_token has shape \(1, 1, 64\).*\(1, 1, 32\)"):
        load_state_dict_checked(small(), other.state_dict())


def test_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "state.pt"
    path.write_bytes(pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="cannot read training state"):
        load_state(path)


def test_state_round_trip(tmp_path):
    state = {"step": 3, "rng": torch.get_rng_state(), "opt": {"lr": 0.1}}
    save_state(state, tmp_path / "s.pt")
    back = load_state(tmp_path / "s.pt")
    assert back["step"] == 3 and torch.equal(back["rng"], state["rng"])


def test_atomic_write_gives_usual_permissions(tmp_path):
    import os

    from vitlab.checkpoint import write_json

    umask = os.umask(0o022)
    try:
        path = write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
