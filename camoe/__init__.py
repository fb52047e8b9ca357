"""Real-time ad scoring with online learning: the shared code of the ``camoe`` command.

Layered from the ground up; an import never runs back up (``tests/unit/test_layers.py``):

1. ``camoe.settings``, ``camoe.features``: the settings and the feature schema.
2. ``camoe.clients``: Kafka client configuration, the Triton and Feast clients.
3. ``camoe.streaming``: the stream app and the Avro codecs; ``camoe.stack``: the local
   services.
4. ``trainer`` (the model, the incremental trainer, the publisher) and ``consumers``
   (the scoring consumer, the labeler).
5. ``camoe.apps``, ``camoe.supervisor``: each component built from the settings, and
   run as processes.
6. ``camoe.sim``, ``camoe.bench``: the simulator and the benchmarks, beside the product.
7. ``camoe.cli``: the command line.
"""
