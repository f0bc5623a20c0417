"""A trained toy world for measuring CRAFT-LoRA: renderer, base model, judges, LoRAs, benchmark.

Library entry points (the ``craft toyworld`` commands call these):

* :func:`craft_toyworld.world.render_many` - ground-truth images of a shape / style;
* :class:`craft_toyworld.judges.Judges` - ``Judges.load(path)(images).records()``;
* :func:`craft_toyworld.catalog.list_world` - shapes, styles, held-out ones, committed LoRAs;
* :func:`craft_toyworld.catalog.write_toy_demo_assets` - a recipe over the committed assets;
* :func:`craft_toyworld.compare.compare_images` - CRAFT-LoRA next to a direct merge;
* :func:`craft_toyworld.train_all.train_world`, :func:`craft_toyworld.suite.train_suite` - training.
"""
