"""Several SAEs trained from one activation stream: every layer of a list from one forward
(``layers=[3,6,9]``, ``hooks=[...]``), or the jobs of a sweep that share a stream
(``hydra/launcher=grouped``).

- ``members.py``: what a member is (name, own run folder, own config), which keys define the stream, the
  members of a ``layers``/``hooks`` run, and the checks that refuse a bad group before any work.
- ``memory.py``: the memory guard (parameters + optimizer state + buffers of the whole group).
- ``data.py``: the one datamodule reading every hook the members need.
- ``module.py``: the Lightning module training every member, each with its own optimizer and schedule.
- ``run.py``: one grouped run, from members to each member's finished run folder.
- ``launcher.py``: the Hydra launcher that groups a sweep's jobs by stream.
"""
