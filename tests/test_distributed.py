"""Data-parallel fits on torch.distributed: two CPU processes over gloo."""

import json
import math
import os
import socket
import subprocess
import sys
import time

import pyro
import pyro.distributions as dist
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import distributed_fit  # noqa: E402

from vi_toolkit import fit  # noqa: E402
from vi_toolkit.distributed import DataParallel  # noqa: E402

HELPER = os.path.join(HERE, "distributed_fit.py")


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in extra:
            env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the helper's fits under torchrun with two processes; each rank's results."""
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           HELPER, "fit", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_every_rank_keeps_identical_parameters(two_ranks):
    """The ranks initialise their networks from different seeds: fit starts them from rank 0's."""
    a, b = (r["full"] for r in two_ranks)
    assert set(a["params"]) == {"net$$$weight", "net$$$bias", "scale", "shift_loc"}
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    for key in a["history"].keys() - {"time"}:  # the recorded losses are the global ones
        assert a["history"][key] == b["history"][key], key


def test_data_parallel_fit_follows_the_single_process_fit(two_ranks):
    """Same seed, same global batches: the averaged gradient is the single-process one."""
    single = distributed_fit.run(num_epochs=4, distributed=False)
    dist_run = two_ranks[0]["full"]
    for key in ("loss", "elbo", "val_elbo", "step", "epoch"):
        assert len(dist_run["history"][key]) == len(single.history[key]) > 0, key
        assert torch.allclose(torch.tensor(dist_run["history"][key], dtype=torch.float64),
                              torch.tensor(single.history[key], dtype=torch.float64),
                              rtol=1e-10, atol=0), key
    for name, value in single.params.items():
        assert torch.allclose(dist_run["params"][name], value, rtol=1e-10, atol=1e-12), name


def test_distributed_resume_ends_where_an_uninterrupted_run_ends(two_ranks):
    for r in two_ranks:
        assert r["resumed"]["history"]["loss"] == r["full"]["history"]["loss"]
        assert r["resumed"]["history"]["val_elbo"] == r["full"]["history"]["val_elbo"]
        for name, value in r["full"]["params"].items():
            assert torch.equal(r["resumed"]["params"][name], value), name


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_crashed_rank_stops_the_others_with_a_clear_error(tmp_path):
    """No torchrun agent to kill the survivor: it must notice the dead peer itself."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, HELPER, "crash", str(tmp_path)],
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    start = time.monotonic()
    try:
        outputs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    elapsed = time.monotonic() - start
    assert procs[1].returncode == 3
    assert procs[0].returncode not in (0, None), outputs[0]
    assert elapsed < 60
    last = outputs[0][1].strip().splitlines()[-1]
    assert "DistributedError" in last and "process 0 of 2" in last and "crashed" in last, last


@pytest.fixture
def torchrun_env(monkeypatch):
    for key, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29999").items():
        monkeypatch.setenv(key, value)


def test_distributed_true_without_torchrun_is_a_value_error(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        distributed_fit.run(num_epochs=1, distributed=True)
    with pytest.raises(ValueError, match="distributed must be"):
        distributed_fit.run(num_epochs=1, distributed="yes")


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=1), "batch_size >= 2"),
    (dict(batch_size=23), "drop_last"),  # 70 = 3 * 23 + 1: a last batch of one point
    (dict(batch_size=None, optimizer="lbfgs"), "lbfgs"),
])
def test_bad_distributed_settings_are_refused_before_connecting(torchrun_env, kwargs, match):
    t, y = distributed_fit.data()
    model, guide = distributed_fit.model_and_guide(0)
    settings = dict(distributed_fit.SETTINGS, **kwargs)
    with pytest.raises(ValueError, match=match):
        fit(model, guide, (t, y), num_epochs=1, **settings)


def test_shards_split_a_batch_into_near_equal_parts(torchrun_env):
    index = torch.arange(15)
    parts = []
    for r in range(2):
        os.environ["RANK"] = str(r)
        parts.append(DataParallel("cpu").shard(index))
    assert [len(p) for p in parts] == [8, 7]
    assert torch.equal(torch.cat(parts), index)


def _run_script(args, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", *args],
                          env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_distributed_vae_example_under_torchrun(tmp_path):
    out = tmp_path / "vae"
    stdout = _run_script(["--nproc_per_node=2", os.path.join(ROOT, "examples", "distributed_vae.py"),
                          "--quick", "--device", "cpu", "--out", str(out)], tmp_path)
    assert stdout.count("distributed VAE (2 process(es))") == 1  # rank 0 alone reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["points_per_second"] > 0
    assert -64 * math.log(2) < metrics["val_elbo_per_point"] < 0  # better than coin flips
    assert (out / "elbo.png").stat().st_size > 0


@pytest.mark.slow
def test_throughput_benchmark_runs(tmp_path):
    out = tmp_path / "bench"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "distributed_throughput.py"),
                    "--quick", "--device", "cpu", "--out", str(out)], env=_env(), check=True,
                   timeout=300, cwd=tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["points_per_second_1_processes"] > 0 and metrics["points_per_second_2_processes"] > 0


def test_a_distributed_fit_needs_the_data_plate_convention(torchrun_env):
    def model(x):
        pyro.sample("x", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0).expand([len(x)]).to_event(1),
                    obs=x)

    def guide(x):
        pass

    with pytest.raises(ValueError, match="a distributed fit .* needs a model that takes the keyword num_data"):
        fit(model, guide, torch.zeros(10), num_steps=1, progress=False)
