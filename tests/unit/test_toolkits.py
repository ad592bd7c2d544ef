"""Toolkit translation, pinned on real Batch AI recipes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from batchd.scheduler import toolkits
from batchd.scheduler.jobspec import parse_job
from batchd.scheduler.nodes import _port_base
from batchd.scheduler.toolkits import Host, JobIdentity, Paths, translate
from tests.unit.test_planner import World

RECIPES = Path(__file__).parents[1] / "data" / "batchai-recipes"
JOB = JobIdentity("vision", "mnist", "train", "0190-job", attempt=2)
PATHS = Paths("/mnt/batch", "/mnt/job", "/tmp/job", "/mnt/shared/job")
HOSTS = [Host("n0", "10.0.0.4", (0, 1)), Host("n1", "10.0.0.5", (0, 1))]


def plans(recipe: str, hosts=HOSTS):
    properties = parse_job(json.loads((RECIPES / recipe).read_text())).properties
    return translate(properties, JOB, hosts, PATHS)


def test_tensorflow_distributed_gets_ps_and_worker_hosts_and_tf_config():
    p0, p1 = plans("TensorFlow__TensorFlow-GPU-Distributed__job.json")
    assert p0.env["AZ_BATCHAI_PS_HOSTS"] == "10.0.0.4:2222"
    assert p0.env["AZ_BATCHAI_WORKER_HOSTS"] == "10.0.0.4:2322,10.0.0.5:2322"
    # after `{`, `set -m`, the script's own files, its stderr and its SIGTERM and USR1 traps
    lines = p0.command.splitlines()[6:]
    assert "(export TF_CONFIG=" in lines[0] and "--job_name=ps" in lines[0]
    assert lines[0].endswith('; exit $s) & servers="$servers $!"')
    config = json.loads(lines[1].split("'")[1])
    assert config == {"cluster": {"ps": ["10.0.0.4:2222"],
                                  "worker": ["10.0.0.4:2322", "10.0.0.5:2322"]},
                      "task": {"type": "worker", "index": 0}}  # fmt: skip
    assert "export AZ_BATCHAI_TASK_INDEX=0; exec python" in lines[1]
    assert "--job_name=ps" not in p1.command and '"index": 1' in p1.command
    assert p0.env["AZ_BATCHAI_OUTPUT_MODEL"] == (
        "/mnt/job/logs/vision/experiments/mnist/jobs/train/0190-job/Models"
    )
    assert p0.env["AZ_BATCHAI_STDOUTERR_DIR"] == "/mnt/job/logs/vision/mnist/train/2/stdouterr"
    assert (p0.env["MASTER_ADDR"], p1.env["RANK"], p1.env["WORLD_SIZE"]) == ("10.0.0.4", "1", "2")


def test_horovod_runs_mpirun_on_the_master_over_the_host_file():
    master, other = plans("Horovod__Horovod-PyTorch__job.json")
    assert master.command == (
        "mpirun --allow-run-as-root --hostfile $AZ_BATCHAI_MPI_HOST_FILE -np 2 "
        "python $AZ_BATCHAI_JOB_MOUNT_ROOT/scripts/horovod/pytorch_mnist.py"
    )
    assert other.command is None
    assert master.files == {"/tmp/job/mpi-hostfile": "10.0.0.4 slots=1\n10.0.0.5 slots=1\n"}
    assert master.env["AZ_BATCHAI_MPI_HOST_FILE"] == "/tmp/job/mpi-hostfile"


def test_pytorch_gloo_runs_on_every_node_with_the_init_method():
    for index, plan in enumerate(plans("PyTorch__PyTorch-GPU-Distributed-Gloo__job.json")):
        assert plan.env["AZ_BATCHAI_PYTORCH_INIT_METHOD"] == "tcp://10.0.0.4:29500"
        assert plan.env["AZ_BATCHAI_TASK_INDEX"] == plan.env["RANK"] == str(index)
        assert plan.command.startswith("python $AZ_BATCHAI_JOB_MOUNT_ROOT/scripts/")


def test_single_node_cntk_brainscript_runs_cntk_directly():
    [plan] = plans("CNTK__CNTK-GPU-BrainScript__job.json", HOSTS[:1])
    assert plan.command == (
        "cntk configFile=$AZ_BATCHAI_INPUT_CONFIG/ConvNet_MNIST.cntk rootDir=. "
        "dataDir=$AZ_BATCHAI_INPUT_DATASET outputDir=$AZ_BATCHAI_OUTPUT_MODEL"
    )
    assert plan.env["AZ_BATCHAI_INPUT_CONFIG"].startswith("/mnt/")
    assert "MASTER_ADDR" not in plan.env and plan.env["AZ_BATCHAI_NUM_GPUS"] == "2"


def test_chainer_with_a_process_count_spreads_slots_over_the_nodes():
    master, _ = plans("Chainer__Chainer-GPU-Distributed-Infiniband__job.json")
    assert " -np 8 python " in master.command
    assert master.files["/tmp/job/mpi-hostfile"] == "10.0.0.4 slots=4\n10.0.0.5 slots=4\n"


def test_a_tensorflow_node_script_exits_with_the_first_failing_worker(tmp_path):
    script = tmp_path / "fake.sh"
    script.write_text('case "$*" in *ps*) sleep 30;; *index=1*) exit 3;; *) exit 0;; esac\n')
    properties = {
        "nodeCount": 1, "stdOutErrPathPrefix": "/logs",
        "tensorFlowSettings": {
            "pythonScriptFilePath": str(script), "pythonInterpreterPath": "sh",
            "workerCount": 2, "parameterServerCount": 1,
            "parameterServerCommandLineArgs": "ps",
            "workerCommandLineArgs": "index=$AZ_BATCHAI_TASK_INDEX",
        },
    }  # fmt: skip
    hosts = [Host("n0", "127.0.0.1", (0,)), Host("n1", "127.0.0.2", (0,))]
    [first, second] = translate(properties, JOB, hosts, PATHS)
    run = {"capture_output": True, "timeout": 20, "cwd": tmp_path}  # (its work directory)
    done = subprocess.run(["bash", "-c", second.command], **run)
    assert done.returncode == 3  # worker 1 failed
    done = subprocess.run(["bash", "-c", first.command], **run)
    assert done.returncode == 0  # worker 0 succeeded; its parameter server was stopped


def test_a_one_node_tensorflow_job_runs_the_parameter_servers_it_asks_for():
    properties = {
        "nodeCount": 1, "stdOutErrPathPrefix": "/logs",
        "tensorFlowSettings": {
            "pythonScriptFilePath": "train.py", "workerCount": 2, "parameterServerCount": 1,
            "parameterServerCommandLineArgs": "--task_index=$AZ_BATCHAI_TASK_INDEX",
        },
    }  # fmt: skip
    [only] = translate(properties, JOB, [Host("n0", "10.0.0.4", (0, 1))], PATHS)
    assert only.env["AZ_BATCHAI_PS_HOSTS"] == "10.0.0.4:2222"
    assert only.env["AZ_BATCHAI_WORKER_HOSTS"] == "10.0.0.4:2322,10.0.0.4:2323"
    server = next(line for line in only.command.splitlines() if '"ps"' in line)
    assert "export AZ_BATCHAI_TASK_INDEX=0;" in server  # its own index among the servers


def test_every_recipe_translates_with_a_command_on_the_master():
    for recipe in sorted(RECIPES.glob("*.json")):
        properties = parse_job(json.loads(recipe.read_text())).properties
        hosts = [Host(f"n{i}", f"10.0.1.{i}", (0,)) for i in range(properties["nodeCount"])]
        plans_ = translate(properties, JOB, hosts, PATHS)
        assert [p.index for p in plans_] == list(range(len(hosts))), recipe.name
        assert plans_[0].command, recipe.name
        assert all(p.env["AZ_BATCHAI_JOB_ID"] == "0190-job" for p in plans_)


def test_jobs_sharing_a_node_get_their_own_ports_from_the_gpus_they_hold():
    """Two live attempts never hold the same GPU, so ports offset by a task's first GPU
    never collide on a node (two distributed jobs whose masters share it)."""
    first = plans("PyTorch__PyTorch-GPU-Distributed-Gloo__job.json")
    beside = [Host("n0", "10.0.0.4", (2, 3)), Host("n1", "10.0.0.5", (6, 7))]
    second = plans("PyTorch__PyTorch-GPU-Distributed-Gloo__job.json", beside)
    assert first[0].env["MASTER_PORT"] == "29500" and second[0].env["MASTER_PORT"] == "29502"
    assert second[1].env["AZ_BATCHAI_PYTORCH_INIT_METHOD"] == "tcp://10.0.0.4:29502"
    tf = plans("TensorFlow__TensorFlow-GPU-Distributed__job.json", beside)
    assert tf[0].env["AZ_BATCHAI_PS_HOSTS"] == "10.0.0.4:2622"  # 2222 + 200 x GPU 2
    assert tf[0].env["AZ_BATCHAI_WORKER_HOSTS"] == "10.0.0.4:2722,10.0.0.5:3522"


def test_ipv6_addresses_are_bracketed_where_a_port_follows():
    hosts = [Host("n0", "fd00::4", (0,)), Host("n1", "fd00::5", (0,))]
    for plan in plans("PyTorch__PyTorch-GPU-Distributed-Gloo__job.json", hosts):
        assert plan.env["AZ_BATCHAI_PYTORCH_INIT_METHOD"] == "tcp://[fd00::4]:29500"
        assert plan.env["MASTER_ADDR"] == "fd00::4"  # an address alone stays as it is
    tf = plans("TensorFlow__TensorFlow-GPU-Distributed__job.json", hosts)
    assert tf[0].env["AZ_BATCHAI_PS_HOSTS"] == "[fd00::4]:2222"


def test_more_tensorflow_processes_a_node_than_it_has_ports_for_are_refused():
    properties = parse_job(
        json.loads((RECIPES / "TensorFlow__TensorFlow-GPU-Distributed__job.json").read_text())
    ).properties
    settings = {**properties["tensorFlowSettings"], "workerCount": 201}
    with pytest.raises(ValueError, match="at most 100 parameter servers and 100 workers"):
        translate({**properties, "tensorFlowSettings": settings}, JOB, HOSTS, PATHS)


def test_nodes_that_share_a_machine_count_their_gpus_one_after_another_for_ports():
    """Local nodes share one machine (and its loopback address): the second node's GPU 0
    is the machine's GPU 4, so jobs whose masters are on different local nodes differ."""
    on_second = [Host("local-1", "127.0.0.1", (0,), port_base=4),
                 Host("local-0", "127.0.0.1", (1,))]  # fmt: skip
    ddp = plans("PyTorch__PyTorch-GPU-Distributed-Gloo__job.json", on_second)
    assert ddp[0].env["MASTER_PORT"] == "29504"


def test_ports_stay_valid_on_a_machine_with_many_local_nodes():
    """`local-40` of 8-GPU nodes starts at the machine's GPU 320: the offsets wrap, and the
    ports a job there asks for are real ones."""
    hosts = [Host("local-40", "127.0.0.1", (7,), port_base=320),
             Host("local-41", "127.0.0.1", (7,), port_base=328)]  # fmt: skip
    ddp = plans("PyTorch__PyTorch-GPU-Distributed-Gloo__job.json", hosts)
    assert ddp[0].env["MASTER_PORT"] == str(29500 + (320 + 7) % 300)
    tf = plans("TensorFlow__TensorFlow-GPU-Distributed__job.json", hosts)
    addresses = ",".join(tf[0].env[k] for k in ("AZ_BATCHAI_PS_HOSTS", "AZ_BATCHAI_WORKER_HOSTS"))
    ports = [int(address.rpartition(":")[2]) for address in addresses.split(",")]
    assert ports and all(1024 < port < 65536 for port in ports), ports


def test_a_local_nodes_port_base_follows_from_its_number_whichever_nodes_exist():
    w = World().cluster(nodes=0)
    for node_id in ("local-2", "local-1"):  # local-0 is gone (or not there yet)
        w.apply("NodeRegistered", nodeId=node_id, cluster="c", gpus=4)  # at 127.0.0.1
    w.apply("NodeRegistered", nodeId="far-3", cluster="c", gpus=8, address="10.0.0.9")
    assert [_port_base(w.models, n) for n in ("local-1", "local-2", "far-3")] == [4, 8, 0]
    for node_id in ("n2", "n3", "box"):  # agents joined by hand on one machine
        w.apply("NodeRegistered", nodeId=node_id, cluster="c", gpus=2)
    assert [_port_base(w.models, n) for n in ("n2", "n3", "box")] == [4, 6, 0]


def test_a_job_may_refer_to_batchds_variables_in_its_variables_and_paths():
    """As Batch AI's documentation says: in environment variables, input directories and
    output directories' suffixes (command lines are run by a shell, which expands them)."""
    properties = parse_job({
        "nodeCount": 2, "stdOutErrPathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/logs",
        "customToolkitSettings": {"commandLine": "true"},
        "outputDirectories": [{"id": "MODEL", "pathPrefix": "$AZ_BATCHAI_MOUNT_ROOT/out",
                               "pathSuffix": "by-name/$AZ_BATCHAI_JOB_NAME"}],
        "inputDirectories": [{"id": "WARM", "path": "${AZ_BATCHAI_OUTPUT_MODEL}/best"}],
        "environmentVariables": [
            {"name": "CKPT", "value": "$AZ_BATCHAI_OUTPUT_MODEL/ckpt-$AZ_BATCHAI_TASK_INDEX"},
            {"name": "LITERAL", "value": "$HOME and $AZ_BATCHAI_NO_SUCH and $$"},
        ],
        "secrets": [{"name": "TOKEN", "value": "$AZ_BATCHAI_JOB_ID"}],  # a secret is as given
    }).properties  # fmt: skip
    p0, p1 = translate(properties, JOB, HOSTS, PATHS, {"TOKEN": "$AZ_BATCHAI_JOB_ID"})
    model = "/mnt/batch/out/vision/experiments/mnist/jobs/train/0190-job/by-name/train"
    assert p0.env["AZ_BATCHAI_OUTPUT_MODEL"] == model and p0.outputs == [model]
    assert p0.env["AZ_BATCHAI_INPUT_WARM"] == f"{model}/best" and p0.inputs == [f"{model}/best"]
    assert (p0.env["CKPT"], p1.env["CKPT"]) == (f"{model}/ckpt-0", f"{model}/ckpt-1")
    assert p0.env["LITERAL"] == "$HOME and $AZ_BATCHAI_NO_SUCH and $$"
    assert p0.env["TOKEN"] == "$AZ_BATCHAI_JOB_ID"


def test_a_node_script_says_the_first_failure_s_own_code_even_when_several_fail_at_once(
    tmp_path,
):
    """Four workers failing at one instant: the task's code is one of theirs, never the 2 of
    a code file read half written; the script's own notices stay out of the task's stderr."""
    workers = [f"(exec sh -c 'sleep 0.3; exit {code}')" for code in (3, 4, 5, 6)]
    script = toolkits._node_script([], workers, master=True)
    for _ in range(8):
        done = subprocess.run(["bash", "-c", script], capture_output=True, timeout=20,
                              cwd=tmp_path)  # fmt: skip
        assert done.returncode in (3, 4, 5, 6) and done.stderr == b""


def test_a_node_script_the_shell_cannot_read_starts_nothing_and_says_why(tmp_path):
    """A user's argument that breaks the script's syntax: the shell says so, and no
    process was started (the script is read whole first)."""
    marker = tmp_path / "started"
    script = toolkits._node_script([f"(exec touch {marker})"], ["(exec echo 'unbalanced)"], True)
    done = subprocess.run(["bash", "-c", script], capture_output=True, timeout=20, cwd=tmp_path)
    assert done.returncode == 2 and b"matching" in done.stderr and not marker.exists()
