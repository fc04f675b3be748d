"""Where a learner rank runs inside Ray (a real local Ray): the address rank 0 gives the other ranks, and the
GPU each rank computes on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
import torch

from learner.data_parallel import free_address, learner_device
from refine.config import RunConfig
from services.ray_runtime import actor_options


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray for this module (ports Ray picks, never 6379), unless one is running already."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, num_gpus=torch.cuda.device_count(), object_store_memory=80 * 1024 * 1024,
                 include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@ray.remote(num_cpus=0.1)
def _rank_0_address() -> tuple[str, str]:
    return free_address(), ray.util.get_node_ip_address()


def test_rank_0_inside_ray_gives_its_node_address_not_the_host_names(local_ray: None) -> None:
    # The host name often resolves to 127.0.0.1 / 127.0.1.1 (/etc/hosts): unreachable from another node.
    address, node_ip = ray.get(_rank_0_address.remote(), timeout=120)
    host, _, port = address.rpartition(":")
    assert host == node_ip and 0 < int(port) < 65536


class _Rank:
    def device(self, configured: str) -> tuple[str, int, list]:
        device = learner_device(configured)
        return device, torch.cuda.current_device(), [str(gpu) for gpu in ray.get_gpu_ids()]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the learner actor asks Ray for one")
def test_a_cuda_learner_actor_holds_a_gpu_of_its_own_and_computes_on_it(local_ray: None) -> None:
    config = RunConfig()
    config.train.device = "cuda"
    options = actor_options(config, "learner") | {"num_cpus": 0.1}
    rank = ray.remote(_Rank).options(**options).remote()
    device, current, gpu_ids = ray.get(rank.device.remote("cuda"), timeout=300)
    assert len(gpu_ids) == 1  # Ray gave it one GPU, and shows it only that one (CUDA_VISIBLE_DEVICES)
    assert device == f"cuda:{current}" == "cuda:0"
    ray.kill(rank)
