"""One-file recipes. Copy one out with `defend cp finetune my_finetune.py` and edit freely."""
