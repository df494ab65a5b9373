#!/bin/bash
# The streaming function's handler under the Lambda Web Adapter (AWS_LAMBDA_EXEC_WRAPPER=/opt/bootstrap):
# the adapter runs this, waits for GET /healthz to answer, then forwards function URL requests.
# Layers unpack under /opt; /opt/python holds the rtqcc layer.
export PYTHONPATH="${LAMBDA_TASK_ROOT}:/opt/python${PYTHONPATH:+:$PYTHONPATH}"
exec python3 "${LAMBDA_TASK_ROOT}/stream_server.py"
