"""DiSP: saliency-guided vision-token masking and self-purification."""
