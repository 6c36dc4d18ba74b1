# lance-serve image for the KubeRay manifests in k8s/ (and for `serve run` on any GPU machine).
#   docker build -t REGISTRY/lance-serve:0.1.0 .
#   lance-serve k8s render --stage-graph multi_gpu --image REGISTRY/lance-serve:0.1.0 -o k8s/multi_gpu.yaml
#
# Ray's own image: Python 3.11, CUDA, Ray 2.60 (the version pyproject pins and the manifests'
# rayVersion), and the bash and wget that KubeRay's start command and health probes run.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${BASE_IMAGE}

# The package is installed (not editable) into the image's Python; the sources are not kept.
COPY --chown=ray:users pyproject.toml README.md /tmp/lance-serve/
COPY --chown=ray:users stages /tmp/lance-serve/stages
COPY --chown=ray:users serve_app /tmp/lance-serve/serve_app
COPY --chown=ray:users deploy /tmp/lance-serve/deploy
# serveConfigV2 names its stage graph as /app/configs/stage_graphs/<graph>.yaml
# (deploy/k8s_render.py: IMAGE_APP_ROOT).
COPY --chown=ray:users configs /app/configs

# torch first, pinned alone (as `make venv` does), then the GPU extra (vllm==0.32.0 and its CUDA
# torchvision etc.). Unlike the CPU venv nothing is uninstalled afterwards: on GPU these builds
# match torch. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 picks another
# CUDA build of torch 2.13.0 if the hosts' driver needs one.
ARG TORCH_INDEX_URL=""
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==2.13.0" \
 && pip install --no-cache-dir "/tmp/lance-serve[gpu]" \
 && rm -rf /tmp/lance-serve

# Fail the build, not the cluster: the Ray version the manifests name, the import_path the Serve
# config names, the CLI, and what KubeRay's probes need.
RUN python -c "import ray, torch, vllm, serve_app.builder; \
assert ray.__version__.startswith('2.60.'), ray.__version__; \
assert torch.__version__.startswith('2.13.0'), torch.__version__; \
assert callable(serve_app.builder.build_app)" \
 && lance-serve --help > /dev/null \
 && test -f /app/configs/lance_2stage.yaml \
 && command -v wget bash > /dev/null

# configs/ lives here (stage graphs by absolute path); the manifests set HF_HOME to their volume.
WORKDIR /app
