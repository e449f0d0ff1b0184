"""The memory estimate of a training step (crfcore.memory); train.py's refusal of a batch
that cannot fit is tested in test_training.py."""
import pytest
import torch

from crfcore import memory
from crfcore.model import CRFNet, ModelConfig


def tiny_model() -> CRFNet:
    return CRFNet(ModelConfig(grid=3, width_mult=0.25))


def test_saved_bytes_grow_with_the_batch():
    net, cpu, batch = tiny_model().train(), torch.device("cpu"), torch.rand(4, 9, 3, 64, 64)
    one = memory.saved_bytes(net, batch[:1].clone(), cpu, "fp32")
    four = memory.saved_bytes(net, batch, cpu, "fp32")
    assert 3.6 < four / one < 4.1  # activations scale with the batch; the weights' share does not
    assert memory.saved_bytes(net, batch, cpu, "bf16") < 0.75 * four


def test_measuring_leaves_the_model_and_the_random_state_as_they_were():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Dropout(0.5)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batch = torch.rand(2, 3, 16, 16)
    rng = torch.random.get_rng_state()
    assert memory.saved_bytes(net, batch, torch.device("cpu"), "fp32") > batch.nbytes
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # batch-norm statistics too
    assert torch.equal(rng, torch.random.get_rng_state())  # dropout drew on a fork


def test_the_largest_batch_that_fits():
    step = memory.StepMemory(per_sample=100, fixed=50)
    assert step.need(3) == 350
    assert step.largest_batch(349) == 2 and step.largest_batch(350) == 3 and step.largest_batch(149) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_free_memory_on_cuda_is_the_gpus():
    free = memory.free_bytes(torch.device("cuda"))
    assert 0 < free <= torch.cuda.get_device_properties(0).total_memory


def write_cgroup(folder, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_a_cgroup_v2_limit_above_the_process_counts(tmp_path):
    """A SLURM job's or a container's limit sits on a parent cgroup; the page cache in its
    use, active or not, is reclaimable, so it counts as free; shared memory is not."""
    root, own = tmp_path / "cg", tmp_path / "self_cgroup"
    write_cgroup(root, {"cgroup.controllers": "cpu memory\n"})
    write_cgroup(root / "job", {"memory.max": f"{8 * memory.GB}\n", "memory.current": f"{6 * memory.GB}\n",
                                "memory.stat": f"anon 1\nfile {2 * memory.GB}\nshmem {memory.GB}\n"
                                                               f"active_file {memory.GB}\n"})
    write_cgroup(root / "job" / "step", {"memory.max": "max\n", "memory.current": "5\n", "memory.stat": ""})
    own.write_text("0::/job/step\n")
    assert memory.cgroup_free(root, own) == 3 * memory.GB


def test_cgroup_v1_without_a_limit_and_a_hidden_folder(tmp_path):
    root, own = tmp_path / "cg", tmp_path / "self_cgroup"
    write_cgroup(root / "memory", {"memory.limit_in_bytes": "9223372036854771712\n",
                                   "memory.usage_in_bytes": "100\n", "memory.stat": "total_cache 0\n"})
    own.write_text("5:cpu,cpuacct:/\n4:memory:/docker/abc\n0::/\n")  # /docker/abc is not visible inside
    assert memory.cgroup_free(root, own) is None
    write_cgroup(root / "memory", {"memory.limit_in_bytes": f"{2 * memory.GB}\n"})
    assert memory.cgroup_free(root, own) == 2 * memory.GB - 100


def test_no_cgroup_information_is_no_limit(tmp_path):
    assert memory.cgroup_free(tmp_path, tmp_path / "missing") is None
    (tmp_path / "self_cgroup").write_text("1:cpu:/\n")  # no memory controller
    assert memory.cgroup_free(tmp_path, tmp_path / "self_cgroup") is None


def test_free_cpu_memory_is_the_least_of_machine_and_cgroup(monkeypatch):
    monkeypatch.setattr(memory, "cgroup_free", lambda: 12345)
    assert memory.free_bytes(torch.device("cpu")) == 12345
    monkeypatch.setattr(memory, "cgroup_free", lambda: None)
    assert memory.free_bytes(torch.device("cpu")) > 12345
