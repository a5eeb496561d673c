"""Config of the tiny Qwen2.5-Math-PRM stand-in (prm.tiny.qwen_prm): Qwen2's, under the class
name the hub repo's config.json maps AutoConfig to. Written for this project; it is copied into
the model directory and loaded from there with trust_remote_code, as the real PRM's is."""

from transformers import Qwen2Config


class Qwen2RMConfig(Qwen2Config):
    pass
