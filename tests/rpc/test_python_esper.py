#!/usr/bin/python3
"""kasmina_client.esper against a real kasminad: esper's presets (numbers read from esper's own
src/esper/runtime/tasks.py), state_dict <-> safetensors round trips, torch.save refused with a
clear error by the helper and by the daemon's LoadWeights.
usage: test_python_esper.py KASMINAD PYDIR"""

import io
import os
import re
import sys
import tempfile

BIN, PYDIR = sys.argv[1], sys.argv[2]
sys.path.insert(0, PYDIR)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helpers"))
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from kasminad import Kasminad  # noqa: E402

import kasmina_client  # noqa: E402
from kasmina_client import Client, esper, pb  # noqa: E402

TASKS = "/work/esper-lite/src/esper/runtime/tasks.py"


def esper_preset_hosts():
    """{preset: {arg: value}} from esper's tasks.py: each _<name>_spec's CNNHost(...) call."""
    src = open(TASKS).read()
    out = {}
    for m in re.finditer(r"def _(\w+)_spec\(\).*?(?=\ndef |\Z)", src, re.S):
        body = m.group(0)
        h = re.search(r"CNNHost\((.*?)\)\n", body, re.S)
        name = re.search(r'name="(\w+)"', body)
        if h and name:
            args = dict(re.findall(r"(\w+)=(\d+)", h.group(1)))
            out[name.group(1)] = {k: int(v) for k, v in args.items()}
    return out


def check_presets():
    if not os.path.exists(TASKS):
        print("esper-lite not present: preset numbers not compared")
        return
    hosts = esper_preset_hosts()
    assert "cifar_baseline" in hosts and "cifar_scale" in hosts, hosts
    for name, args in hosts.items():
        if name not in esper.PRESETS:
            continue
        ours = esper.preset_host(name)["cnn"]
        for k, v in args.items():
            assert ours[k] == v, (name, k, ours[k], v)
    src = open(TASKS).read()
    ts = esper.preset_host("tinystories")["transformer"]
    assert f"vocab_size = {ts['vocab_size']}" in src and f"n_embd={ts['n_embd']}" in src
    assert f"n_head={ts['n_head']}" in src and f"n_layer={ts['n_layer']}" in src


def main():
    assert re.match(r"\d+\.\d+\.\d+$", kasmina_client.__version__)
    check_presets()
    with tempfile.TemporaryDirectory() as tmp:
        d = Kasminad(BIN, tmp + "/k.sock", tmp + "/kasminad.log", "--no-cuda", "--no-persist")
        try:
            with Client("unix:" + tmp + "/k.sock", wait_for_ready=True) as c:
                esper.create_from_preset(c, "m", "cifar_baseline", slots=["r0c1", "r1c1"])
                cnn = c.get_model("m").cnn
                assert (cnn.base_channels, cnn.n_blocks, cnn.num_classes) == (8, 3, 10), cnn
                c.germinate("m", "r0c1", "conv_light")
                blob = c.export_weights("m")
                sd = esper.safetensors_to_state_dict(blob, torch_tensors=True)
                assert sd["host.blocks.0.conv.weight"].shape == (8, 3, 3, 3)
                assert sd["host.blocks.0.bn.num_batches_tracked"].shape == ()
                assert isinstance(sd["seed_slots.r0c1._extra_state"], dict)
                # A perturbed state_dict goes in and comes back exactly.
                g = torch.Generator().manual_seed(1)
                sd2 = {k: (v + torch.randn(v.shape, generator=g)) if torch.is_tensor(v) and
                       v.is_floating_point() else v for k, v in sd.items()}
                c.load_weights("m", esper.state_dict_to_safetensors(sd2))
                back = esper.safetensors_to_state_dict(c.export_weights("m"))
                for k, v in sd2.items():
                    if torch.is_tensor(v):
                        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
                # torch.save bytes: the helper refuses them, and so does the daemon.
                for zip_format in (True, False):
                    b = io.BytesIO()
                    torch.save(sd2, b, _use_new_zipfile_serialization=zip_format)
                    try:
                        c.load_weights("m", b.getvalue())
                        raise AssertionError("the client took a torch.save file")
                    except esper.TorchSaveFileError as e:
                        assert "torch.save" in str(e)
                    try:
                        c._stub.LoadWeights(pb.LoadWeightsRequest(model_id="m",
                                                                  safetensors=b.getvalue()))
                        raise AssertionError("the daemon took a torch.save file")
                    except grpc.RpcError as e:
                        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
                        assert "PyTorch torch.save file" in e.details(), e.details()
                # evaluate() with no configs: "main", the model as it is.
                x = np.zeros((2, 3, 32, 32), np.float32)
                r = c.evaluate("m", x, np.array([0, 1]))
                assert [e.name for e in r.results] == ["main"], r.results
        finally:
            d.stop()
    print("python esper ok")


if __name__ == "__main__":
    main()
