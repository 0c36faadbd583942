# CPU image of the Deep Pneumonia DICOM node.
#   docker build -t deep-pneumonia .
#   docker run -p 11112:11112 -v dp-spool:/var/lib/dp-node -v /path/to/bundle:/bundle:ro deep-pneumonia \
#     --allow CR_ROOM1 --allow PACS --allow-network 10.20.0.0/16 --destination PACS@pacs.example.org:104
# The bundle is a dp-train output folder; results go to the destinations given (or, with
# none, to /var/lib/dp-node/results). The node listens on every interface of the container,
# but accepts only the calling AE titles given with --allow, from the networks given with
# --allow-network (loopback only until you say otherwise: an image run as-is accepts no one).
# TLS: mount a certificate and key and pass --config with a tls: section (README, "Security").
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DP_NODE_PORT=11112 \
    DP_NODE_METRICS_PORT=8089 \
    DP_NODE_BUNDLE=/bundle

WORKDIR /app
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY transforms ./transforms
COPY dp_model ./dp_model
COPY pacs_node ./pacs_node
COPY configs ./configs

# CPU-only PyTorch wheels (2.14.1+cpu satisfies the ==2.14.1 pin), then the package.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 \
 && pip install -c requirements/constraints.txt .

RUN useradd --system --uid 10001 --home-dir /var/lib/dp-node --create-home dpnode \
 && chmod 0700 /var/lib/dp-node
USER dpnode
VOLUME ["/var/lib/dp-node"]
EXPOSE 11112

# The node's own verdict (GET /health on loopback): worker and senders alive and moving,
# disk not full, audit trail written. A C-ECHO would answer even with a dead worker.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD python -m pacs_node.health

ENTRYPOINT ["sh", "-c", "exec dp-node --config configs/node.yaml --host 0.0.0.0 --port \"$DP_NODE_PORT\" --metrics-port \"$DP_NODE_METRICS_PORT\" --bundle \"$DP_NODE_BUNDLE\" --spool /var/lib/dp-node/spool --output-dir /var/lib/dp-node/results \"$@\"", "dp-node"]
