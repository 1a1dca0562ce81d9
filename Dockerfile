# glow-lightning on a CUDA-enabled PyTorch image; the `glow` command is the entrypoint.
#   docker build -t glow-lightning .
#   mkdir -p data runs && docker run --gpus all --ipc=host --user "$(id -u):$(id -g)" \
#     -v "$PWD/data:/work/data" -v "$PWD/runs:/work/runs" glow-lightning \
#     fit --config configs/cifar.yaml --config configs/ddp.yaml
# Another CUDA / PyTorch pairing: docker build --build-arg BASE_IMAGE=pytorch/pytorch:<tag> -t glow-lightning .
# (torch >= 2.6 and its torchvision: pyproject.toml's floors, checked by tests/min_versions.sh)
ARG BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/glow

# A non-root user; its home is writable by any uid, so `docker run --user "$(id -u):$(id -g)"` works too
# (caches of torch, W&B and matplotlib live there).
RUN useradd --create-home --uid 1000 --shell /bin/bash glow && chmod 1777 /home/glow

WORKDIR /work
# The image's torch (with CUDA) is kept (a constraint: pip may not replace it; a base image below the
# floor fails here); pip adds Lightning, W&B, TensorBoard (and torchvision if the image lacks it).
COPY pyproject.toml README.md LICENSE ./
COPY glow_lightning ./glow_lightning
RUN python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/keep-torch.txt \
    && pip install --no-cache-dir -c /tmp/keep-torch.txt . \
    && rm /tmp/keep-torch.txt && glow --version
# A real one-step CPU fit on 12 generated 16x16 PNGs (tiny model, no logger): the build fails if `glow fit`
# cannot train in this image. HOME points elsewhere so no cache lands in the user's home as root.
RUN cd /tmp && mkdir smoke-home && python -c "import os, numpy as np; from PIL import Image; \
os.makedirs('smoke/img'); [Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)) \
.save(f'smoke/img/{i}.png') for i in range(12)]" \
    && HOME=/tmp/smoke-home glow fit --data ImageFolderDataModule --data.data_dir smoke/img --data.image_size 16 \
        --data.batch_size 4 --data.num_workers 0 --data.val_size 2 \
        --model.levels 2 --model.steps_per_level 2 --model.hidden_channels 8 \
        --trainer.accelerator cpu --trainer.devices 1 --trainer.max_steps 1 --trainer.limit_val_batches 1 \
        --trainer.logger false --trainer.enable_progress_bar false --trainer.default_root_dir smoke/run \
    && test -f smoke/run/checkpoints/last.ckpt \
    && rm -rf /tmp/smoke /tmp/smoke-home
# the configs ship inside the package: --config cifar.yaml (or configs/cifar.yaml) finds them
RUN mkdir -p data runs && chown -R glow:glow /work

USER 1000:1000
ENTRYPOINT ["glow"]
CMD ["--help"]
