# GPU image for cluster users: NGC PyTorch carries CUDA, a matching torch and Transformer Engine.
# Build: docker build -t steplaw-train .   Use: see README "On a SLURM cluster".
FROM nvcr.io/nvidia/pytorch:25.04-py3

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
RUN pip list --format=freeze | grep -iE '^(torch|transformer[-_]engine[a-z0-9_-]*)==' > /tmp/keep.txt \
 && PIP_CONSTRAINT=/tmp/keep.txt pip install --no-cache-dir -e ".[gpu]" \
 && python -c "import megatron.core, transformer_engine, steplaw_train"

WORKDIR /workspace
CMD ["python", "-m", "steplaw_train.sweep", "--help"]
