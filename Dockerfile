# The fewshot package and REST service with the embedded default encoder and the face encoder; the
# ONNX exports are done at build time so the container starts warm.
#   docker build -t fewshot .
#   docker run -p 8000:8000 -v $PWD/data:/data fewshot
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 FEWSHOT_DATA_DIR=/data FEWSHOT_CACHE_DIR=/opt/fewshot-cache
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fewshot ./fewshot
COPY fewshot_service ./fewshot_service
RUN pip install ".[face,postgres]" \
 && python -c "from fewshot import create_encoder; [create_encoder(s, device='cpu', runtime='onnx', cache_dir='/opt/fewshot-cache') for s in ('efficientnet_lite0', 'face')]" \
 && useradd --create-home fewshot && mkdir -p /data && chown fewshot /data && chmod -R a+rX /opt/fewshot-cache
USER fewshot
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz')"
CMD ["fewshot", "serve", "--host", "0.0.0.0", "--port", "8000"]
