"""Starting a recipe on many processes: on this node (``local``: torchrun, the deepspeed launcher) or
on a Ray cluster (``ray_train``: embedded, or an existing one by address)."""
