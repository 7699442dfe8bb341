"""defend: backdoor defenses for multimodal LLMs and masked-diffusion LMs."""

__version__ = "0.1.1"
