"""The export test of transformers' common model tests, for our models.

In transformers 5.2x `ModelTesterMixin` inherits its export tests from `ExportTesterMixin` in
`tests/exporters/test_export.py`, a file the sdist does not ship (`_hf_common_tests.py` stubs its import with this
module). This mixin keeps upstream's contract: a test class sets `test_torch_exportable`, and every class of
`all_model_classes` is exported with `torch.export` from the tester's config and inputs and must give eager's outputs
(every tensor of the output, 1e-5). As our models export for a fixed image size, the batch dimension is the dynamic
one: the exported program also runs a batch of another size.
"""

import torch
from torch.utils._pytree import tree_leaves


class ExportTesterMixin:
    test_torch_exportable = True

    def _export_inputs(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        inputs = {name: value for name, value in inputs.items() if name != "labels"}
        return config, inputs

    def _assert_same_outputs(self, exported, model, inputs):
        with torch.no_grad():
            expected = [leaf for leaf in tree_leaves(model(**inputs)) if isinstance(leaf, torch.Tensor)]
            actual = [leaf for leaf in tree_leaves(exported(**inputs)) if isinstance(leaf, torch.Tensor)]
        self.assertEqual(len(actual), len(expected))
        self.assertTrue(expected, "the model returned no tensor")
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)

    def test_torch_export(self):
        if not self.test_torch_exportable:
            self.skipTest(reason="Model architecture is not torch exportable")
        config, inputs = self._export_inputs()
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic_shapes = {name: {0: batch} for name in inputs}
        for model_class in self.all_model_classes:
            with self.subTest(model_class.__name__):
                model = model_class(config).eval()
                program = torch.export.export(model, args=(), kwargs=inputs, dynamic_shapes=dynamic_shapes)
                self._assert_same_outputs(program.module(), model, inputs)
                fewer = {name: value[:1] for name, value in inputs.items()}
                self._assert_same_outputs(program.module(), model, fewer)
