import torch
from minift.models.lm_loss import lm_loss
x = torch.randn(2, 9, 8, device="cuda", requires_grad=True); w = torch.randn(70, 8, device="cuda")
t = torch.randint(0, 70, (2, 9), device="cuda"); print("ok loss", lm_loss(x, w, t).item())
t[1, 4] = 70
try:
    lm_loss(x, w, t).item(); print("NO ERROR")
except RuntimeError as e:
    print("device assert raised:", str(e).splitlines()[0][:200])
