# glow-lightning on a CUDA-enabled PyTorch image; the `glow` command is the entrypoint.
#   docker build -t glow-lightning .
#   mkdir -p data runs && docker run --gpus all --ipc=host --user "$(id -u):$(id -g)" \
#     -v "$PWD/data:/work/data" -v "$PWD/runs:/work/runs" glow-lightning \
#     fit --config configs/cifar.yaml --config configs/ddp.yaml
# Another CUDA / PyTorch pairing: docker build --build-arg BASE_IMAGE=pytorch/pytorch:<tag> -t glow-lightning .
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
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
# The image's torch (with CUDA) satisfies the torch requirement; pip adds Lightning, W&B, TensorBoard.
COPY pyproject.toml README.md LICENSE ./
COPY glow_lightning ./glow_lightning
RUN pip install --no-cache-dir . && glow --version
COPY configs ./configs
RUN mkdir -p data runs && chown -R glow:glow /work

USER 1000:1000
ENTRYPOINT ["glow"]
CMD ["--help"]
