# CPU image of the Deep Pneumonia DICOM node.
#   docker build -t deep-pneumonia .
#   docker run -p 11112:11112 -v dp-spool:/var/lib/dp-node -v /path/to/bundle:/bundle:ro deep-pneumonia \
#     --destination PACS@pacs.example.org:104
# The bundle is a dp-train output folder; results go to the destinations given (or, with
# none, to /var/lib/dp-node/results).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DP_NODE_PORT=11112 \
    DP_NODE_BUNDLE=/bundle

# dcmtk provides echoscu for the health check (a real C-ECHO, not a TCP probe).
RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk \
 && rm -rf /var/lib/apt/lists/*

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

RUN useradd --system --uid 10001 --home-dir /var/lib/dp-node --create-home dpnode
USER dpnode
VOLUME ["/var/lib/dp-node"]
EXPOSE 11112

HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD echoscu -to 5 -aec DPNODE localhost "$DP_NODE_PORT" || exit 1

ENTRYPOINT ["sh", "-c", "exec dp-node --config configs/node.yaml --port \"$DP_NODE_PORT\" --bundle \"$DP_NODE_BUNDLE\" --spool /var/lib/dp-node/spool --output-dir /var/lib/dp-node/results \"$@\"", "dp-node"]
