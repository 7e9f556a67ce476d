"""Training micro-batches: the pairs of each planned micro-batch, tokenized in the run's input format."""

from __future__ import annotations

from rerankflow.formatting import check_input_format, tokenize_pairs


class Collator:
    """Tokenizes (query, passage) pairs in the run's input format (:func:`rerankflow.formatting.tokenize_pairs`:
    the prompt template as one text, or a sentence pair with segment ids 0/1) with dynamic padding."""

    def __init__(self, tokenizer, template, max_length, pad_multiple, input_format):
        self.tok = tokenizer
        self.template = template
        self.max_length = max_length
        self.pad_multiple = pad_multiple
        self.input_format = check_input_format(input_format)

    def __call__(self, pairs):
        return tokenize_pairs(self.tok, [q for q, _p in pairs], [p for _q, p in pairs], input_format=self.input_format,
                              template=self.template, max_length=self.max_length, padding="longest",
                              return_tensors="pt", pad_to_multiple_of=self.pad_multiple)


class _MicroBatches:
    """This rank's micro-batches of one epoch from a start step, tokenized (optionally in DataLoader workers)."""

    def __init__(self, plan, start_step, dist, data, collator):
        self.items = [mb for step in plan.steps[start_step:] for mb in step[dist.rank::dist.world]]
        self.negatives = plan.negatives
        self.data = data
        self.collator = collator

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        """``(labels, encoding, teacher)``: labels 1.0 for a positive (slot 0) else 0.0, and the teacher's
        logits (:meth:`rerankflow.train.data.TrainExample.teacher_logits`; None when the data has none), in
        row order."""
        pairs, labels, teacher = [], [], []
        for ei, slot in self.items[i]:
            ex = self.data.examples[ei]
            d = ex.positive if slot == 0 else self.negatives[ei][slot - 1]
            pairs.append((ex.question, self.data.passages[d]))
            labels.append(1.0 if slot == 0 else 0.0)
            if teacher is not None and ex.teacher:
                teacher.append(ex.teacher_logits([d])[0])
            else:
                teacher = None
        return labels, self.collator(pairs), teacher


def epoch_batches(plan, start_step, dist, data, collator, num_workers):
    """An iterator over this rank's ``(labels, encoding, teacher)`` micro-batches of ``plan`` from ``start_step``;
    with ``num_workers`` > 0 tokenized ahead in DataLoader worker processes."""
    ds = _MicroBatches(plan, start_step, dist, data, collator)
    if num_workers <= 0:
        return (ds[i] for i in range(len(ds)))
    import torch

    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                         collate_fn=lambda x: x, prefetch_factor=4, persistent_workers=False)
    return iter(loader)
