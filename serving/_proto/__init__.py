"""Generated Open Inference Protocol messages and stubs (protos/generate.py writes them)."""

from . import grpc_service_pb2 as pb
from . import grpc_service_pb2_grpc as pb_grpc
from . import model_config_pb2 as model_config
from ._pool import POOL

__all__ = ["pb", "pb_grpc", "model_config", "POOL"]
