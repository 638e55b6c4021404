# GPU image for cluster users: NGC PyTorch carries CUDA, a matching torch and Transformer Engine.
# Build: docker build -t steplaw-train .   Use: see README "On a SLURM cluster".
# 25.11: Transformer Engine 2.9 and torch 2.10 (CUDA 13), inside the range megatron-core 0.16.1
# is tested with (TE >=2.9,<2.12; torch >=2.6). 25.04 carried TE 2.2. The build fails if the
# image's TE falls outside the gpu extra's range (the pinned TE then conflicts with it), so a tag
# bump is checked.
FROM nvcr.io/nvidia/pytorch:25.11-py3

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline \
    WANDB_DIR=/workspace/wandb \
    HYDRA_FULL_ERROR=1 \
    STEPLAW_DATA_ROOT=/workspace/data

WORKDIR /opt/steplaw-train
COPY . .
# Keep the image's own torch and Transformer Engine: pin them to what is installed so pip never
# replaces them with PyPI wheels, then install this project with its GPU extra.
# --no-build-isolation: nothing of TE is rebuilt against a throw-away torch if pip ever needs to.
RUN pip list --format=freeze | grep -iE '^(torch|transformer[-_]engine[a-z0-9_-]*)==' > /tmp/keep.txt \
 && PIP_CONSTRAINT=/tmp/keep.txt pip install --no-cache-dir --no-build-isolation -e ".[gpu]" \
 && python -c "import megatron.core, transformer_engine.pytorch, steplaw_train"

WORKDIR /workspace
CMD ["python", "-m", "steplaw_train.sweep", "--help"]
