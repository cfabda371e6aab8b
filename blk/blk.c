/* placeholder until the blk/ implementation lands */
