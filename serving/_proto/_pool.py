"""maskbank's own protobuf descriptor pool (see protos/generate.py for why it is not the default)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
