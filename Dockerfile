# The fewshot package with its embedded default encoder, ONNX export done at build time so the
# container starts warm. Build: docker build -t fewshot .   Run: docker run -v $PWD/data:/data fewshot embed /data/images /data/out
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fewshot ./fewshot
RUN pip install . \
 && python -c "from fewshot import create_encoder; create_encoder(device='cpu', runtime='onnx')"

RUN useradd --create-home fewshot && cp -r /root/.cache /home/fewshot/.cache && chown -R fewshot /home/fewshot/.cache
USER fewshot
ENTRYPOINT ["fewshot"]
CMD ["--help"]
