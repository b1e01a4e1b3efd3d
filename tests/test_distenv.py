"""Device choice and the distributed environment as pure functions of (environment variables,
number of visible CUDA devices): every launcher case of a GPU cluster, tested on a CPU."""
import os

import pytest

from imgclf.engine import distenv

SLURM_JOB = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]"}
PORT_4242 = distenv.job_port("4242")


def torchrun(rank, world=4, local_world=4):
    return {"TORCHELASTIC_RUN_ID": "none", "RANK": str(rank), "LOCAL_RANK": str(rank % local_world),
            "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(local_world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29400"}


def slurm_task(rank, ntasks, nodes, **extra):
    per_node = ntasks // nodes
    return {**SLURM_JOB, "SLURM_NTASKS": str(ntasks), "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(rank // per_node),
            **extra}


# (case, env, visible CUDA devices, config device) -> (rank, world, local rank, device, master addr, port)
CASES = [
    ("torchrun 1x4, rank 0", torchrun(0), 4, "auto", (0, 4, 0, "cuda:0", "127.0.0.1", 29400)),
    ("torchrun 1x4, rank 3", torchrun(3), 4, "auto", (3, 4, 3, "cuda:3", "127.0.0.1", 29400)),
    ("torchrun 1x4, device cuda", torchrun(2), 4, "cuda", (2, 4, 2, "cuda:2", "127.0.0.1", 29400)),
    # submitit on SLURM, 1 node x 4 tasks, every task sees the node's 4 GPUs
    ("submitit 1x4, shared GPUs, rank 3", slurm_task(3, 4, 1, SLURM_JOB_NODELIST="gpu07"), 4, "auto",
     (3, 4, 3, "cuda:3", "gpu07", PORT_4242)),
    # ... with per-task CUDA_VISIBLE_DEVICES (--gpus-per-task): each task sees one GPU, numbered 0
    ("submitit 1x4, one GPU per task, rank 3", slurm_task(3, 4, 1, SLURM_JOB_NODELIST="gpu07",
                                                          CUDA_VISIBLE_DEVICES="3"), 1, "auto",
     (3, 4, 3, "cuda:0", "gpu07", PORT_4242)),
    ("2 nodes x 8, rank 0", slurm_task(0, 16, 2), 8, "auto", (0, 16, 0, "cuda:0", "gpu07", PORT_4242)),
    ("2 nodes x 8, rank 13", slurm_task(13, 16, 2), 8, "auto", (13, 16, 5, "cuda:5", "gpu07", PORT_4242)),
    # A job submitted from another job / a torchrun shell: its stale RANK/WORLD_SIZE/MASTER_* lose
    ("submitit 1x4 under inherited torchrun vars", {**torchrun(0, world=8), **slurm_task(1, 4, 1)}, 4, "auto",
     (1, 4, 1, "cuda:1", "gpu07", PORT_4242)),
    # SLURM variables of a parent allocation alone (imgclf train in salloc, snakemake in a job): one process
    ("inherited SLURM vars, plain process", {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
                                             "SLURM_LOCALID": "2", "SLURM_JOB_NODELIST": "gpu01"}, 4, "auto",
     (0, 1, 0, "cuda:0", "127.0.0.1", 29500)),
    ("submitit local 2 tasks on CPU", {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "999",
                                       "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
                                       "SUBMITIT_LOCAL_LOCALID": "1", "RANK": "0", "WORLD_SIZE": "1"}, 0, "auto",
     (1, 2, 1, "cpu", "127.0.0.1", distenv.job_port("999"))),
    ("one process, no GPU", {}, 0, "auto", (0, 1, 0, "cpu", "127.0.0.1", 29500)),
    ("one process, cuda:1 of 2", {}, 2, "cuda:1", (0, 1, 0, "cuda:1", "127.0.0.1", 29500)),
]


@pytest.mark.parametrize("case,env,n_visible,requested,expect", CASES, ids=[c[0] for c in CASES])
def test_rank_world_device_and_rendezvous(case, env, n_visible, requested, expect):
    d = distenv.resolve(env)
    dev = distenv.device(requested, d, n_visible)
    assert (d.rank, d.world_size, d.local_rank, dev, d.master_addr, d.master_port) == expect
    if dev.startswith("cuda:"):
        assert int(dev.split(":")[1]) < n_visible  # always a visible device


def test_every_rank_of_a_job_agrees_on_the_rendezvous():
    ds = [distenv.resolve(slurm_task(r, 16, 2)) for r in range(16)]
    assert {(d.master_addr, d.master_port, d.world_size) for d in ds} == {("gpu07", PORT_4242, 16)}
    assert sorted(d.rank for d in ds) == list(range(16))
    assert distenv.MIN_PORT <= PORT_4242 <= distenv.MAX_PORT


@pytest.mark.parametrize("batch,world,sub,ok", [(128, 4, 1, 32), (128, 8, 2, 16), (128, 3, 1, None),
                                                (100, 8, 1, None)])
def test_a_gpu_count_that_does_not_divide_the_batch_is_refused_in_one_line(batch, world, sub, ok):
    if ok is not None:
        assert distenv.per_rank_batch(batch, world, sub) == ok
        return
    with pytest.raises(ValueError) as e:
        distenv.per_rank_batch(batch, world, sub)
    msg = str(e.value)
    assert "\n" not in msg and f"train.batch_size {batch}" in msg and f"world size {world}" in msg


@pytest.mark.parametrize("requested,n_visible,local_world,why", [
    ("cuda", 0, 1, "no CUDA device is visible"),
    ("cuda:2", 2, 1, "is not visible"),
    ("cuda:0", 4, 4, "ranks share this node"),
    ("auto", 2, 4, "4 ranks on this node but 2 visible"),
])
def test_impossible_devices_are_refused_in_one_line(requested, n_visible, local_world, why):
    d = distenv.DistEnv(rank=0, world_size=local_world, local_world_size=local_world)
    with pytest.raises(ValueError, match=why) as e:
        distenv.device(requested, d, n_visible)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("nodelist,first", [("gpu[07-08,11],cpu01", "gpu07"), ("node1,node2", "node1"),
                                            ("a-b[003]", "a-b003"), ("single", "single"),
                                            ("rack[1-2]-n[01-04]", "rack1-n01"), ("x[3,1]y[2]", "x3y2")])
def test_first_host_of_a_slurm_hostlist(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "")  # no scontrol: the parser's answer
    assert distenv.first_host(nodelist) == first


@pytest.mark.parametrize("nodelist,hosts", [
    ("gpu[07-08,11],cpu01", ["gpu07", "gpu08", "gpu11", "cpu01"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),  # the start's padding, past its width
    ("a[1-2]b,c[9-10]", ["a1b", "a2b", "c9", "c10"]),
    ("r[1]-s[2]-t[3,5]", ["r1-s2-t3", "r1-s2-t5"]),
    (" node7 ", ["node7"]),
])
def test_a_slurm_hostlist_expands_like_scontrol_show_hostnames(nodelist, hosts):
    assert distenv.hostnames(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "gpu[07-08", "gpu07]", "gpu[a-b]", "gpu[3-1]", "a,,b", "a[1-2,]"])
def test_a_malformed_hostlist_is_refused_in_one_line(nodelist):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST") as e:
        distenv.hostnames(nodelist)
    assert "\n" not in str(e.value)


def test_first_host_asks_scontrol_where_slurm_is_installed(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo "$3-from-slurm" && echo other\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert distenv.first_host("rack[1-2]-n[01-04]") == "rack[1-2]-n[01-04]-from-slurm"
    fake.write_text("#!/bin/sh\nexit 1\n")  # scontrol fails (no slurm.conf): the parser answers
    assert distenv.first_host("rack[1-2]-n[01-04]") == "rack1-n01"


def test_the_rendezvous_port_avoids_the_ephemeral_range_and_well_known_ports():
    """Linux hands out 32768-60999 to outgoing connections: a rendezvous port there can already
    be taken when rank 0 binds it."""
    ports = {distenv.job_port(str(job)) for job in range(20000)}
    assert min(ports) >= 1024 and max(ports) < 32768
    assert not ports & distenv.RESERVED_PORTS and {29500, 29400, 27017} <= distenv.RESERVED_PORTS
    assert len(ports) > 10000  # still spread: two jobs on a node rarely collide


# --------------------------------------------------------------------------- the launcher's job setup
@pytest.fixture
def job_env(monkeypatch):
    """A clean environment for launch._job_setup, restored afterwards (it writes os.environ)."""
    for k in [*distenv.EXPORTED, "CUDA_VISIBLE_DEVICES", "SLURM_CPUS_PER_TASK", "TORCHELASTIC_RUN_ID",
              "SUBMITIT_LOCAL_JOB_ID", "SUBMITIT_EXECUTOR"] + [k for k in os.environ if k.startswith("SLURM_")]:
        # setenv first: monkeypatch records (and so restores) only what it changes, and _job_setup
        # writes RANK/WORLD_SIZE/MASTER_* that would otherwise leak into the next test's Trainer.
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)

    def set_env(env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    return set_env


def test_job_setup_keeps_every_gpu_visible_so_local_rank_names_one(job_env):
    """Defect 1: submitit's export set CUDA_VISIBLE_DEVICES to the local rank, so task 2 saw one
    GPU (numbered 0) while the trainer chose cuda:2 -> 'invalid device ordinal'."""
    from imgclf.launch import _job_setup

    job_env({**slurm_task(2, 4, 1), "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    _job_setup()
    visible = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
    assert visible == ["0", "1", "2", "3"]
    d = distenv.resolve(os.environ)
    assert distenv.device("auto", d, len(visible)) == "cuda:2"
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("2", "2", "4")


@pytest.mark.parametrize("inherited", [
    {"MASTER_ADDR": "login01", "MASTER_PORT": "12345", "RANK": "0"},
    {"MASTER_ADDR": "login01", "MASTER_PORT": "12345", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"},
])
def test_job_setup_replaces_rendezvous_inherited_from_the_submitting_shell(job_env, inherited, caplog):
    """Defect 2: an inherited MASTER_ADDR/RANK made submitit refuse the export, which was
    swallowed (or WORLD_SIZE made it look like torchrun had run): N undistributed copies."""
    from imgclf.launch import _job_setup

    job_env({**inherited, **slurm_task(3, 4, 1)})
    _job_setup()
    got = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    assert got == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(PORT_4242)}
    assert "MASTER_ADDR=login01" in caplog.text  # said, not silent


def test_no_variable_of_the_job_setup_tests_leaks():
    assert "WORLD_SIZE" not in os.environ and "MASTER_ADDR" not in os.environ


@pytest.mark.parametrize("rank", range(8))
def test_torchrun_two_nodes_of_four_separates_rank_from_local_rank(rank):
    """torchrun --nnodes 2 --nproc-per-node 4: global ranks 4..7 are local ranks 0..3 of the
    second node, whose four GPUs are cuda:0..3 (a mix-up of RANK and LOCAL_RANK would name cuda:4+)."""
    env = torchrun(rank, world=8, local_world=4)
    d = distenv.resolve(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (rank, 8, rank % 4, 4)
    assert d.source == "torchrun" and d.distributed
    assert distenv.device("auto", d, 4) == f"cuda:{rank % 4}"
    assert distenv.device("cuda", d, 4) == f"cuda:{rank % 4}"
    exported: dict[str, str] = {}
    distenv.export(d, exported)
    assert (exported["RANK"], exported["LOCAL_RANK"], exported["WORLD_SIZE"], exported["LOCAL_WORLD_SIZE"]) == \
        (str(rank), str(rank % 4), "8", "4")
    with pytest.raises(ValueError, match="4 ranks share this node"):
        distenv.device("cuda:1", d, 4)
