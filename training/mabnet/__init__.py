"""MABNet gallery training: `training.mabnet.model` (the blocks, weight transfer, gallery descriptor) and
`training.mabnet.train` (`retrieval-sdk train mabnet`: the loss, training, ablations, evaluation)."""
