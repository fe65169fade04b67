/**
 * How a directory tree travels over HTTP, the same from an agent (src/agent/transfer.ts) and
 * from the checkpoint store (src/checkpoint-store/routes.ts): a GNU tar archive made and read
 * with TAR_FLAGS, whose sha256 and length follow the body as these trailers.
 */

export const SHA256_TRAILER = 'x-chipmunk-sha256';
export const BYTES_TRAILER = 'x-chipmunk-bytes';

/**
 * Both ends use the same flags: numeric ids because the hosts' user databases may differ;
 * every xattr namespace (the default is user.* only) so overlay opaque dirs keep
 * trusted.overlay.*; ACLs; sparse files stay sparse. Whiteouts (char devices 0/0) need no
 * flag, only root, which the agent is.
 */
export const TAR_FLAGS = ['--numeric-owner', '--xattrs', '--xattrs-include=*', '--acls', '-S'];
