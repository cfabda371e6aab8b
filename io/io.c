/* placeholder until the io/ implementation lands */
