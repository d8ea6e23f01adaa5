"""Bare fp32 forward of ResNet-101 three ways (plain stride 32, layer4 dilated, trunk cut after layer3 with a
1024-channel head), batch 16 at 224 px, two threads, through the Scorer's prepare_model. Round 5 of cam-findings."""
import time, torch, json
from torch import nn
from cxr_batch.model.network import build_model, CamResNet
from cxr_batch.jobs.score_stages import prepare_model
from cxr_batch.pixels.transforms import normalize
torch.set_num_threads(2)
def l3(m):
    trunk = nn.Sequential(*list(m.trunk.children())[:-1])
    return CamResNet(trunk, 1024)
x = normalize(torch.randint(0, 256, (16, 224, 224), dtype=torch.uint8), channels_last=True)
out = {}
for name, mk in [("plain s32", lambda: build_model("resnet101", "none", cam_stride=32)),
                 ("dilated s16", lambda: build_model("resnet101", "none", cam_stride=16)),
                 ("layer3 head s16", lambda: l3(build_model("resnet101", "none", cam_stride=32)))]:
    m = prepare_model(mk().eval(), torch.device("cpu"), channels_last=True, compile=False)
    with torch.inference_mode():
        m(x); m(x)
        t0 = time.perf_counter(); n = 0
        while time.perf_counter() - t0 < 25:
            lo, f = m(x); n += 16
        out[name] = [round(n / (time.perf_counter() - t0), 2), tuple(f.shape[-2:])]
print(json.dumps(out))
