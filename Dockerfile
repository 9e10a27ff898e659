# The fewshot REST service and CLI for the CPU, with the embedded default encoder and the face encoder
# exported at build time (the container starts warm) and no torch, CUDA or compiler in the final image.
#   docker build --format docker -t fewshot .     # podman/buildah: --format docker keeps the HEALTHCHECK
#   docker build -t fewshot .                     # Docker
#   docker run -p 8000:8000 -v $PWD/data:/data fewshot
# The data directory must be writable by uid 1000 (`sudo chown 1000 data`), or run with --user $(id -u).
# BASE: any Debian-like image with python3 (>= 3.10) and its venv module; CI builds on a local debootstrap one.
# For CUDA, see Dockerfile.gpu.
ARG BASE=python:3.11-slim

# ---------------------------------------------------------------- the two requirement lists, from pyproject.toml
FROM ${BASE} AS requirements
COPY pyproject.toml /src/
COPY deploy/requirements.py /src/deploy/
RUN cd /src && python3 deploy/requirements.py build > build.txt && python3 deploy/requirements.py serve > serve.txt

# ---------------------------------------------------------------- build: everything, to export the encoders
FROM ${BASE} AS build
# pip trusts the system's certificates (a proxy's CA installed with update-ca-certificates included)
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180
WORKDIR /src
# the requirements first: a layer kept while they are unchanged (whatever else pyproject.toml says)
COPY --from=requirements /src/build.txt /src/serve.txt /tmp/
RUN python3 -m venv /opt/build && python3 -m venv /opt/venv \
 && /opt/build/bin/pip install -q -r /tmp/build.txt \
 && /opt/venv/bin/pip install -q -r /tmp/serve.txt \
 && rm -rf /root/.cache/pip
COPY pyproject.toml ./
COPY README.md ./
COPY fewshot ./fewshot
COPY fewshot_service ./fewshot_service
COPY fewshot_client ./fewshot_client
RUN /opt/build/bin/pip install -q --no-deps . && /opt/venv/bin/pip install -q --no-deps . \
 && /opt/build/bin/python -c "from fewshot import create_encoder; [print(create_encoder(s, device='cpu', runtime='onnx', cache_dir='/opt/fewshot-cache')) for s in ('efficientnet_lite0', 'face')]" \
 && /opt/venv/bin/python -c "from fewshot import create_encoder; [create_encoder(s, device='cpu', runtime='onnx', cache_dir='/opt/fewshot-cache') for s in ('efficientnet_lite0', 'face')]" \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} + \
 && rm -f /opt/venv/lib/python3*/site-packages/face_recognition_models/models/shape_predictor_68_face_landmarks.dat

# ---------------------------------------------------------------- the service: ONNX Runtime, no torch
FROM ${BASE}
# the exports lie in the default cache of the CLI and the service alike, for uid 1000 or any --user (HOME is set)
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HOME=/home/fewshot FEWSHOT_DATA_DIR=/data \
    FEWSHOT_CACHE_DIR=/home/fewshot/.cache/fewshot
RUN useradd --uid 1000 --create-home fewshot && chmod 755 /home/fewshot && mkdir -p /data && chown fewshot /data
COPY --from=build /opt/venv /opt/venv
# owned by the service's user: an int8 runtime (FEWSHOT_RUNTIME=onnx-int8) is quantised into it at first start
COPY --from=build --chown=1000:1000 /opt/fewshot-cache /home/fewshot/.cache/fewshot
USER fewshot
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["fewshot", "serve", "--host", "0.0.0.0", "--port", "8000"]
