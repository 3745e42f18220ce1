/* Periodic neighbour lists of crystals, CGCNN's selection rules, compiled by crystal_transfer.native.
 *
 * For every atom i of a crystal (lattice rows a, b, c; fractional coordinates f) the candidates are all pairs
 * (j, image n) with squared distance |(f_j + n - f_i) L|^2 < r^2 + tol2 (pymatgen's find_points_in_spheres
 * test, tol2 = 1e-8; below pymatgen's min_r of 1 A: d <= r), except the atom itself (distance <= 1e-8 A and
 * the same element). They are ranked as
 * graphs.select_neighbours does: when there are more than M, only those within the M-th smallest distance
 * plus `margin` are kept; sorted by (distance, j, image); consecutive distances closer than `tie_tol` form one
 * shell; a shell is ordered by (j, image); the first M are the atom's neighbours. Images are counted from the
 * wrapped coordinates f - floor(f): that shifts every image of one j by the same vector and keeps their order.
 *
 * The search runs image by image: for atom i and lattice translation T (|n_k| <= r |column k of L^-1| + 1, which
 * covers every image of wrapped coordinates), the squared distances to all j in one vectorisable loop, then the
 * j within the cut-off without a branch. A translation is skipped when the cell's centre C satisfies
 * |C + T - X_i| >= r + rho, rho the largest distance of an atom from C.
 *
 * Compiled with -O2 -ffp-contract=off and without -ffast-math: IEEE arithmetic, no fused multiply-adds, so that
 * the distances do not depend on the CPU. Distances may differ from pymatgen's in the last
 * bits (another summation order), which the float32 output and the 1e-6 A tie tolerance absorb; the tests
 * compare the two on real crystals.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    double d2;
    int64_t j;
    int64_t n[3];
} ct_candidate;

/* (distance, j, image) order */
static int before(const ct_candidate *a, const ct_candidate *b) {
    if (a->d2 != b->d2) return a->d2 < b->d2;
    if (a->j != b->j) return a->j < b->j;
    for (int k = 0; k < 3; k++)
        if (a->n[k] != b->n[k]) return a->n[k] < b->n[k];
    return 0;
}

/* (j, image) order, inside one shell */
static int before_in_shell(const ct_candidate *a, const ct_candidate *b) {
    if (a->j != b->j) return a->j < b->j;
    for (int k = 0; k < 3; k++)
        if (a->n[k] != b->n[k]) return a->n[k] < b->n[k];
    return 0;
}

static int compare(const void *x, const void *y) {
    const ct_candidate *a = x, *b = y;
    return before(a, b) ? -1 : before(b, a) ? 1 : 0;
}

static void insertion_sort(ct_candidate *c, int64_t n, int (*less)(const ct_candidate *, const ct_candidate *)) {
    for (int64_t i = 1; i < n; i++) {
        ct_candidate key = c[i];
        int64_t k = i - 1;
        while (k >= 0 && less(&key, &c[k])) {
            c[k + 1] = c[k];
            k--;
        }
        c[k + 1] = key;
    }
}

/* the k-th smallest (0-based) of v[0..n) by quickselect; v is reordered */
static double kth_smallest(double *v, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        double pivot = v[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] < pivot) i++;
            while (v[j] > pivot) j--;
            if (i <= j) {
                double t = v[i];
                v[i] = v[j];
                v[j] = t;
                i++;
                j--;
            }
        }
        if (k <= j)
            hi = j;
        else if (k >= i)
            lo = i;
        else
            return v[k];
    }
    return v[k];
}

/* 3x3 inverse of row-major m into inv; returns 0 when singular */
static int invert3(const double *m, double *inv) {
    double c00 = m[4] * m[8] - m[5] * m[7], c01 = m[5] * m[6] - m[3] * m[8], c02 = m[3] * m[7] - m[4] * m[6];
    double det = m[0] * c00 + m[1] * c01 + m[2] * c02;
    if (!(fabs(det) > 0)) return 0;
    inv[0] = c00 / det;
    inv[1] = (m[2] * m[7] - m[1] * m[8]) / det;
    inv[2] = (m[1] * m[5] - m[2] * m[4]) / det;
    inv[3] = c01 / det;
    inv[4] = (m[0] * m[8] - m[2] * m[6]) / det;
    inv[5] = (m[2] * m[3] - m[0] * m[5]) / det;
    inv[6] = c02 / det;
    inv[7] = (m[1] * m[6] - m[0] * m[7]) / det;
    inv[8] = (m[0] * m[4] - m[1] * m[3]) / det;
    return 1;
}

/* One crystal of `na` atoms. Outputs: idx (na*M, int64) and dist (na*M, float32) filled with the neighbours
 * and padded with (0, pad_dist); count (na): real neighbours per atom. buf, cap: a reusable candidate buffer.
 * Returns 0, -1 when memory runs out, -2 for a singular lattice, -3 for non-finite coordinates. */
static int crystal(int64_t na, const double *lat, const double *frac, const int64_t *numbers, double radius,
                   int64_t M, double tol2, double tie_tol, double margin, float pad_dist, int64_t *idx, float *dist,
                   int64_t *count, ct_candidate **buf, int64_t *cap, double **dbuf, int64_t *dcap) {
    double inv[9];
    if (!invert3(lat, inv)) return -2;
    /* pymatgen keeps d^2 < r^2 + tol2, except below its min_r of 1 A, where it keeps d <= r (exact test below) */
    int below_min_r = radius < 1.0;
    double cut2 = below_min_r ? radius * radius * (1.0 + 1e-12) : radius * radius + tol2;
    double self2 = tol2 * tol2; /* the atom itself: distance <= tol2 (1e-8 A) and the same element */
    double reach = sqrt(cut2) * (1.0 + 1e-12) + 1e-12;
    /* wrapped Cartesian positions X_j = (f_j - floor(f_j)) L, by coordinate (a vectorisable inner loop), and d2 */
    double *x = malloc((size_t)(na > 0 ? na : 1) * 5 * sizeof(double));
    if (!x) return -1;
    double *y = x + na, *z = y + na, *d2 = z + na;
    int64_t *near = (int64_t *)(d2 + na); /* the j within the cut-off of one image */
    for (int64_t a = 0; a < na * 3; a++) {
        if (!isfinite(frac[a])) {
            free(x);
            return -3;
        }
    }
    for (int64_t a = 0; a < na; a++) {
        double w0 = frac[3 * a] - floor(frac[3 * a]), w1 = frac[3 * a + 1] - floor(frac[3 * a + 1]);
        double w2 = frac[3 * a + 2] - floor(frac[3 * a + 2]);
        x[a] = w0 * lat[0] + w1 * lat[3] + w2 * lat[6];
        y[a] = w0 * lat[1] + w1 * lat[4] + w2 * lat[7];
        z[a] = w0 * lat[2] + w1 * lat[5] + w2 * lat[8];
    }
    /* the atoms lie within rho of the cell's centre C: an image T can hold a neighbour of atom i only if
     * |C + T - X_i| < reach + rho */
    double cx = 0.5 * (lat[0] + lat[3] + lat[6]), cy = 0.5 * (lat[1] + lat[4] + lat[7]);
    double cz = 0.5 * (lat[2] + lat[5] + lat[8]), rho = 0.0;
    for (int64_t a = 0; a < na; a++) {
        double r2 = (x[a] - cx) * (x[a] - cx) + (y[a] - cy) * (y[a] - cy) + (z[a] - cz) * (z[a] - cz);
        if (r2 > rho) rho = r2;
    }
    rho = sqrt(rho) * (1.0 + 1e-12) + 1e-9;
    double far2 = (reach + rho) * (reach + rho);
    /* images n with |n_k| <= R_k + 1: the k-th fractional component of a vector of length <= reach is at most
     * reach |column k of L^-1|, and wrapped coordinates differ by less than 1 */
    int64_t N[3];
    double images = 1.0;
    for (int k = 0; k < 3; k++) {
        double extent = ceil(reach * sqrt(inv[k] * inv[k] + inv[3 + k] * inv[3 + k] + inv[6 + k] * inv[6 + k])) + 1;
        images *= 2 * extent + 1;
        if (!(images <= 1e8)) { /* a cell far thinner than the radius (or nearly singular): refused, not searched */
            free(x);
            return -4;
        }
        N[k] = (int64_t)extent;
    }
    for (int64_t i = 0; i < na; i++) {
        int64_t nc = 0;
        for (int64_t n0 = -N[0]; n0 <= N[0]; n0++) {
            for (int64_t n1 = -N[1]; n1 <= N[1]; n1++) {
                for (int64_t n2 = -N[2]; n2 <= N[2]; n2++) {
                    /* the image's offset from atom i: T - X_i */
                    double ox = n0 * lat[0] + n1 * lat[3] + n2 * lat[6] - x[i];
                    double oy = n0 * lat[1] + n1 * lat[4] + n2 * lat[7] - y[i];
                    double oz = n0 * lat[2] + n1 * lat[5] + n2 * lat[8] - z[i];
                    double gx = cx + ox, gy = cy + oy, gz = cz + oz;
                    if (gx * gx + gy * gy + gz * gz >= far2) continue;
                    for (int64_t j = 0; j < na; j++) {
                        double dx = x[j] + ox, dy = y[j] + oy, dz = z[j] + oz;
                        d2[j] = dx * dx + dy * dy + dz * dz;
                    }
                    int64_t found = 0;
                    for (int64_t j = 0; j < na; j++) { /* without a branch: most j of an image are too far */
                        near[found] = j;
                        found += d2[j] < cut2;
                    }
                    for (int64_t t = 0; t < found; t++) {
                        int64_t j = near[t];
                        if (below_min_r && !(sqrt(d2[j]) <= radius)) continue;
                        if (d2[j] <= self2 && numbers[i] == numbers[j]) continue; /* the atom itself */
                        if (nc == *cap) {
                            int64_t grown = *cap ? 2 * *cap : 256;
                            ct_candidate *more = realloc(*buf, (size_t)grown * sizeof(ct_candidate));
                            if (!more) {
                                free(x);
                                return -1;
                            }
                            *buf = more;
                            *cap = grown;
                        }
                        ct_candidate *c = *buf + nc++;
                        c->d2 = d2[j];
                        c->j = j;
                        c->n[0] = n0;
                        c->n[1] = n1;
                        c->n[2] = n2;
                    }
                }
            }
        }
        ct_candidate *c = *buf;
        if (nc > M) { /* pre-selection: within the M-th smallest distance plus margin */
            if (nc > *dcap) {
                double *more = realloc(*dbuf, (size_t)nc * sizeof(double));
                if (!more) {
                    free(x);
                    return -1;
                }
                *dbuf = more;
                *dcap = nc;
            }
            for (int64_t a = 0; a < nc; a++) (*dbuf)[a] = c[a].d2;
            /* sqrt is monotonic: the M-th smallest distance is the root of the M-th smallest square */
            double limit = sqrt(kth_smallest(*dbuf, nc, M - 1)) + margin;
            double coarse = limit * (1.0 + 1e-9);
            coarse *= coarse; /* a cheap test on squares first, the exact one (as NumPy's) on the few left */
            int64_t kept = 0;
            for (int64_t a = 0; a < nc; a++)
                if (c[a].d2 <= coarse && sqrt(c[a].d2) <= limit) c[kept++] = c[a];
            nc = kept;
        }
        if (nc <= 32)
            insertion_sort(c, nc, before);
        else
            qsort(c, (size_t)nc, sizeof(ct_candidate), compare);
        /* shells of distances closer than tie_tol to the previous one, each ordered by (j, image) */
        int64_t start = 0;
        double previous = nc ? sqrt(c[0].d2) : 0.0;
        for (int64_t a = 1; a <= nc; a++) {
            double here = a < nc ? sqrt(c[a].d2) : 0.0;
            if (a == nc || here - previous > tie_tol) {
                if (a - start > 1) insertion_sort(c + start, a - start, before_in_shell);
                if (a >= M) break;
                start = a;
            }
            previous = here;
        }
        int64_t take = nc < M ? nc : M;
        count[i] = take;
        for (int64_t s = 0; s < M; s++) {
            idx[i * M + s] = s < take ? c[s].j : 0;
            dist[i * M + s] = s < take ? (float)sqrt(c[s].d2) : pad_dist;
        }
    }
    free(x);
    return 0;
}

/* Crystals [0, n_crystals): atoms of crystal c are rows atom_ptr[c]..atom_ptr[c+1] of frac/numbers (and of
 * idx/dist/count); lattices are row-major 3x3; radii[c] is its cut-off and pad_dist[c] its padded slots' distance.
 * Returns 0, or the first failing crystal's error code (-1 memory, -2 singular lattice, -3 non-finite
 * coordinates, -4 more than 1e8 periodic images to search) with its index in *failed. */
int64_t ct_neighbour_lists(int64_t n_crystals, const int64_t *atom_ptr, const double *lattices, const double *frac,
                           const int64_t *numbers, const double *radii, const float *pad_dist, int64_t M,
                           double tol2, double tie_tol, double margin, int64_t *idx, float *dist, int64_t *count,
                           int64_t *failed) {
    ct_candidate *buf = NULL;
    double *dbuf = NULL;
    int64_t cap = 0, dcap = 0;
    int status = 0;
    for (int64_t c = 0; c < n_crystals; c++) {
        int64_t a0 = atom_ptr[c], na = atom_ptr[c + 1] - a0;
        status = crystal(na, lattices + 9 * c, frac + 3 * a0, numbers + a0, radii[c], M, tol2, tie_tol, margin,
                         pad_dist[c], idx + a0 * M, dist + a0 * M, count + a0, &buf, &cap, &dbuf, &dcap);
        if (status != 0) {
            *failed = c;
            break;
        }
    }
    free(buf);
    free(dbuf);
    return status;
}
