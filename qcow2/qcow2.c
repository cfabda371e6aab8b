/* placeholder until the qcow2/ implementation lands */
