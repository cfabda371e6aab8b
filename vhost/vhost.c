/* placeholder until the vhost/ implementation lands */
