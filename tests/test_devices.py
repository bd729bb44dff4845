"""Every stage where training ran: device resolution, and the CPU and GPU paths agreeing (GPU tests run where CUDA is)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurocl.embed import resolve_device
from neurocl.errors import ConfigError
from neurocl.methods import build_method

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _module():
    torch.manual_seed(0)
    return build_method({"name": "sepclr", "common_dim": 4, "salient_dim": 4}, {"name": "small_cnn", "width": 4}).eval()


def test_auto_device_is_the_gpu_when_there_is_one_else_the_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_embedding_does_not_depend_on_the_batch_size(tiny_store):
    module = _module()
    indices = np.arange(len(tiny_store))
    small, large = module.embed_store(tiny_store, indices, 3), module.embed_store(tiny_store, indices, 16)
    assert small.keys() == large.keys() == {"common", "salient"}
    for space in small:
        np.testing.assert_allclose(small[space], large[space], rtol=1e-5, atol=1e-6)


@needs_cuda
def test_gpu_embeddings_equal_cpu_embeddings(tiny_store):
    indices = np.arange(len(tiny_store))
    on_cpu = _module().embed_store(tiny_store, indices, 8)
    on_gpu = _module().to("cuda").embed_store(tiny_store, indices, 8)
    tiny_store.to("cpu")
    for space in on_cpu:
        np.testing.assert_allclose(on_gpu[space], on_cpu[space], rtol=1e-3, atol=1e-4)


@needs_cuda
def test_gpu_occlusion_and_gradient_maps_equal_cpu_maps(tiny_store):
    from neurocl.maps.attribution import gradient_x_input, occlusion

    volumes = torch.as_tensor(np.asarray(tiny_store.volumes[:2], dtype=np.float32))
    net = _module().net
    results = {}
    for device in ("cpu", "cuda"):
        model = net.to(device)
        x = volumes.to(device)
        results[device] = (gradient_x_input(model, x).cpu(), occlusion(model, x, patch=4, stride=4).cpu())
    for cpu_map, gpu_map in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(gpu_map, cpu_map, rtol=1e-3, atol=1e-4)
