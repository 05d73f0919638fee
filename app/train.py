"""Train the class-conditional CFG model on Fashion-MNIST: python -m app.train --out model_store/NAME.

Label dropout to the null class with probability p_uncond (Ho & Salimans 2022, Algorithm 1),
epsilon prediction, an EMA of the weights, AdamW with warmup and cosine decay.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from app.data import CLASS_NAMES, DEFAULT_DATA_DIR, DatasetMissingError, load_fashion_mnist
from app.models import build_unet, load_checkpoint, save_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("model_store/fashion-mnist-cfg"))
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--steps", type=int, default=3300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--p-uncond", type=float, default=0.15, help="label dropout probability (0.1 to 0.2)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--channels", type=str, default="32,64,128", help="UNet block_out_channels")
    p.add_argument(
        "--beta-schedule",
        default="linear",
        choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
        help="noise schedule (diffusers' beta_schedule); see docs/quality.md for why linear",
    )
    p.add_argument("--init-from", type=Path, default=None, help="start from this checkpoint's weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this wall time")
    p.add_argument("--save-every", type=int, default=500, help="write the EMA checkpoint every N steps")
    return p.parse_args(argv)


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warmup then cosine decay to 0, as a factor of the base lr."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    images, labels = load_fashion_mnist("train", args.data_dir)
    images, labels = images.to(device), labels.to(device)
    null_label = len(CLASS_NAMES)
    channels = tuple(int(c) for c in args.channels.split(","))

    unet = build_unet(image_size=28, num_classes=len(CLASS_NAMES), block_out_channels=channels)
    if args.init_from:
        unet.load_state_dict(load_checkpoint(args.init_from).unet.state_dict())
    unet.to(device)
    # The cosine schedule's last step has alpha_bar ~ 2e-9 (sigma ~ 2e4): the sigma-space samplers
    # (Euler, DPM-Solver) then amplify any eps error 2e4-fold at the first step. The linear
    # schedule of Ho et al. 2020 ends at sigma ~ 157, which every sampler handles.
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=args.beta_schedule, prediction_type="epsilon", clip_sample=True
    )
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=2 / 3)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, args.steps, args.warmup))
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    start = time.monotonic()
    steps_done = 0

    def save(step: int) -> None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
        save_checkpoint(
            args.out,
            unet,
            noise_scheduler,
            {
                "name": args.out.name,
                "class_names": CLASS_NAMES,
                "null_label": null_label,
                "image_size": 28,
                "in_channels": 1,
                "prediction_type": "epsilon",
                "training": {
                    "data": f"Fashion-MNIST train split (60000 images) from {args.data_dir}",
                    "steps_done": step,
                    "wall_minutes": round((time.monotonic() - start) / 60, 1),
                    "device": str(device),
                    "torch": torch.__version__,
                    "ema": True,
                    **settings,
                },
            },
        )
        ema.restore(unet.parameters())

    bar = tqdm(range(args.steps), desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)
    loss_avg = None
    for step in bar:
        idx = torch.randint(0, images.shape[0], (args.batch_size,), device=device)
        x0, y = images[idx], labels[idx].clone()
        # Horizontal flips: the garment classes are mirror-symmetric.
        flip = torch.rand(x0.shape[0], device=device) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        # Ho & Salimans 2022: drop the label to the null class with probability p_uncond.
        y[torch.rand(y.shape[0], device=device) < args.p_uncond] = null_label
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=device)
        noise = torch.randn_like(x0)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t, class_labels=y).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        ema.step(unet.parameters())
        steps_done = step + 1
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if args.save_every and steps_done % args.save_every == 0:
            save(steps_done)
        if args.max_minutes and time.monotonic() - start > args.max_minutes * 60:
            bar.write(f"stopping at step {steps_done}: --max-minutes {args.max_minutes} reached")
            break
    bar.close()
    save(steps_done)
    return args.out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        out = train(args)
    except DatasetMissingError as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
