"""Images and labelled data: which files are images, validation datasets, synthetic shapes."""
