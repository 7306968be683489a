"""Checkpoints: one file, atomic writes, safe loading, resuming ends where an unbroken run ends."""

import os

import pytest
import torch

from vi_toolkit.guides import conjugate as conjugate_guide
from vi_toolkit.models import conjugate
from vi_toolkit import fit, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def x():
    return 3.0 + torch.randn(120, generator=torch.Generator().manual_seed(0))


def _fit(x, **kwargs):
    settings = dict(lr=0.05, batch_size=25, num_particles=2, lr_schedule="cosine",
                    progress=False, seed=11, val_data=x[:30])
    settings.update(kwargs)
    return fit(conjugate.model, conjugate_guide.guide, x, **settings)


def _same(a, b):
    for key in a.history.keys() - {"time"}:  # wall-clock times differ, nothing else may
        assert a.history[key] == b.history[key], key
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_checkpoint_holds_the_whole_state(tmp_path, x):
    path = tmp_path / "fit.pt"
    result = _fit(x, num_epochs=2, checkpoint=path)
    state = load_checkpoint(path)
    assert set(state["params"]) == {"mu_loc", "mu_scale"}
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 10
    assert state["history"] == result.history
    assert state["config"]["batch_size"] == 25 and state["progress"]["epoch"] == 2
    assert torch.equal(state["params"]["mu_loc"], result.params["mu_loc"])


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, x):
    path = tmp_path / "fit.pt"
    unbroken = _fit(x, num_epochs=4)
    _fit(x, num_epochs=4, checkpoint=path, callbacks=[lambda e: e.epoch == 2])  # stops at 2
    assert load_checkpoint(path)["progress"]["epoch"] == 2
    resumed = _fit(x, num_epochs=4, checkpoint=path, resume=True)
    _same(resumed, unbroken)


def test_resume_after_an_interrupt_mid_epoch(tmp_path, x):
    """Ctrl-C between logging intervals: the last completed interval is kept and resumable."""
    path = tmp_path / "fit.pt"
    unbroken = _fit(x, num_epochs=3, options={"log_every": 2})

    def interrupt(event):
        if event.epoch == 2:
            raise KeyboardInterrupt

    with pytest.warns(UserWarning, match="interrupted"):
        stopped = _fit(x, num_epochs=3, options={"log_every": 2}, checkpoint=path, callbacks=[interrupt])
    assert stopped.stopped == "interrupted"
    resumed = _fit(x, num_epochs=3, options={"log_every": 2}, checkpoint=path, resume=path)
    _same(resumed, unbroken)


def test_resume_refuses_different_settings(tmp_path, x):
    path = tmp_path / "fit.pt"
    _fit(x, num_epochs=1, checkpoint=path)
    with pytest.raises(ValueError, match="settings differ.*batch_size"):
        _fit(x, num_epochs=2, checkpoint=path, resume=True, batch_size=20)
    with pytest.raises(ValueError, match="does not exist"):
        _fit(x, num_epochs=2, resume=tmp_path / "missing.pt")


def test_a_crash_while_writing_leaves_the_previous_checkpoint_readable(tmp_path, monkeypatch, x):
    path = tmp_path / "fit.pt"
    save_checkpoint(path, {"params": {"a": torch.ones(3)}})

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"params": {"a": torch.zeros(3)}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["params"]["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["fit.pt"]  # no temporary file left behind


class Payload:
    def __reduce__(self):
        return (os.system, ("echo unsafe",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "vi-toolkit-checkpoint", "version": 1, "x": Payload()}, path)
    with pytest.raises(ValueError, match="not a readable vi-toolkit checkpoint"):
        load_checkpoint(path)
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(truncated, {"params": {"a": torch.ones(1000)}})
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(truncated)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
