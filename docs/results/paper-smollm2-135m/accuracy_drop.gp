# gnuplot script written by edgepatch report SWEEP; `gnuplot accuracy_drop.gp` redraws accuracy_drop.png and .pdf
if (!exists("png")) png = 'accuracy_drop.png'
if (!exists("pdf")) pdf = 'accuracy_drop.pdf'
$p0 << EOD
0 0 0.3750 "0.38"
1 0 0.0417 "0.04"
2 0 0.0000 "0.00"
0 1 0.0000 "0.00"
1 1 0.0417 "0.04"
2 1 0.0000 "0.00"
0 2 0.0000 "0.00"
1 2 0.0000 "0.00"
2 2 0.1667 "0.17"
0 3 0.0000 "0.00"
1 3 0.0000 "0.00"
2 3 0.0000 "0.00"
0 4 0.0000 "0.00"
1 4 0.0000 "0.00"
2 4 0.0000 "0.00"
EOD
$p1 << EOD
0 0 0.0000 "0.00"
1 0 0.0000 "0.00"
2 0 -0.0417 "-0.04"
0 1 -0.0417 "-0.04"
1 1 0.0000 "0.00"
2 1 0.0000 "0.00"
0 2 0.0000 "0.00"
1 2 0.0000 "0.00"
2 2 0.3333 "0.33"
0 3 -0.0417 "-0.04"
1 3 -0.0417 "-0.04"
2 3 0.0000 "0.00"
0 4 -0.0417 "-0.04"
1 4 0.0000 "0.00"
2 4 0.2083 "0.21"
EOD
$p2 << EOD
0 0 0.2083 "0.21"
1 0 -0.0417 "-0.04"
2 0 0.0000 "0.00"
0 1 0.0000 "0.00"
1 1 0.0000 "0.00"
2 1 0.0000 "0.00"
0 2 0.0000 "0.00"
1 2 0.0000 "0.00"
2 2 0.6667 "0.67"
0 3 0.0000 "0.00"
1 3 -0.0417 "-0.04"
2 3 -0.0833 "-0.08"
0 4 -0.0417 "-0.04"
1 4 -0.0417 "-0.04"
2 4 0.0000 "0.00"
EOD
$p3 << EOD
0 0 0.0000 "0.00"
1 0 -0.0417 "-0.04"
2 0 0.0000 "0.00"
0 1 -0.1667 "-0.17"
1 1 0.0000 "0.00"
2 1 0.0000 "0.00"
0 2 0.0417 "0.04"
1 2 0.0417 "0.04"
2 2 0.0833 "0.08"
0 3 0.0000 "0.00"
1 3 0.0417 "0.04"
2 3 0.0417 "0.04"
0 4 0.0000 "0.00"
1 4 0.0000 "0.00"
2 4 0.0417 "0.04"
EOD
$p4 << EOD
0 0 0.3333 "0.33"
1 0 0.0000 "0.00"
2 0 0.0000 "0.00"
0 1 0.0000 "0.00"
1 1 0.0000 "0.00"
2 1 0.0000 "0.00"
0 2 0.0000 "0.00"
1 2 0.0000 "0.00"
2 2 0.1667 "0.17"
0 3 0.0000 "0.00"
1 3 0.0000 "0.00"
2 3 0.0000 "0.00"
0 4 0.0000 "0.00"
1 4 0.0000 "0.00"
2 4 0.0417 "0.04"
EOD
$p5 << EOD
0 0 0.2083 "0.21"
1 0 -0.0833 "-0.08"
2 0 0.0000 "0.00"
0 1 0.0000 "0.00"
1 1 0.0417 "0.04"
2 1 0.0417 "0.04"
0 2 0.0000 "0.00"
1 2 0.0000 "0.00"
2 2 0.6667 "0.67"
0 3 0.0000 "0.00"
1 3 0.0000 "0.00"
2 3 0.0000 "0.00"
0 4 0.0417 "0.04"
1 4 0.0000 "0.00"
2 4 0.0833 "0.08"
EOD
$p6 << EOD
0 0 0.2500 "0.25"
1 0 0.0833 "0.08"
2 0 0.0000 "0.00"
0 1 -0.0417 "-0.04"
1 1 0.1250 "0.12"
2 1 0.0000 "0.00"
0 2 0.0000 "0.00"
1 2 0.1667 "0.17"
2 2 0.3750 "0.38"
0 3 0.0000 "0.00"
1 3 0.0000 "0.00"
2 3 -0.0833 "-0.08"
0 4 0.0000 "0.00"
1 4 0.0000 "0.00"
2 4 0.0000 "0.00"
EOD
set palette defined (0 '#2166ac', 1 '#f7f7f7', 2 '#b2182b')
set cbrange [-0.833333:0.833333]
set tics scale 0
set terminal pngcairo noenhanced size 1520,770 font 'sans,10'
set output png
set multiplot layout 2,4 title "smollm2-135m: accuracy drop when an edge group is ablated in a band of the layers (drop = full - ablated)" noenhanced
set title "copying (n = 24, full 0.96)" noenhanced
set xlabel 'layer band' offset 0,-0.8
set ylabel 'edge group'
set xrange [-0.5:2.5]
set yrange [4.5:-0.5]
set xtics ("1/3\nL0-9" 0, "2/3\nL10-19" 1, "3/3\nL20-29" 2)
set ytics ("x->y same" 0, "y->y earlier" 1, "y->last" 2, "x->last" 3, "query->last" 4)
unset colorbox
plot $p0 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p0 using 1:2:4 with labels notitle
set title "country_capital (n = 24, full 0.33)" noenhanced
set xlabel 'layer band' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [4.5:-0.5]
set xtics ("1/3\nL0-9" 0, "2/3\nL10-19" 1, "3/3\nL20-29" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4)
unset colorbox
plot $p1 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p1 using 1:2:4 with labels notitle
set title "present_past (n = 24, full 0.79)" noenhanced
set xlabel 'layer band' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [4.5:-0.5]
set xtics ("1/3\nL0-9" 0, "2/3\nL10-19" 1, "3/3\nL20-29" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4)
unset colorbox
plot $p2 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p2 using 1:2:4 with labels notitle
set title "person_sport (n = 24, full 0.29)" noenhanced
set xlabel 'layer band' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [4.5:-0.5]
set xtics ("1/3\nL0-9" 0, "2/3\nL10-19" 1, "3/3\nL20-29" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4)
unset colorbox
plot $p3 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p3 using 1:2:4 with labels notitle
set title "capitalization (n = 24, full 1.00)" noenhanced
set xlabel 'layer band' offset 0,-0.8
set ylabel 'edge group'
set xrange [-0.5:2.5]
set yrange [4.5:-0.5]
set xtics ("1/3\nL0-9" 0, "2/3\nL10-19" 1, "3/3\nL20-29" 2)
set ytics ("x->y same" 0, "y->y earlier" 1, "y->last" 2, "x->last" 3, "query->last" 4)
unset colorbox
plot $p4 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p4 using 1:2:4 with labels notitle
set title "ambiguous_present_past (n = 24, full 0.71)" noenhanced
set xlabel 'layer band' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [4.5:-0.5]
set xtics ("1/3\nL0-9" 0, "2/3\nL10-19" 1, "3/3\nL20-29" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4)
unset colorbox
plot $p5 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p5 using 1:2:4 with labels notitle
set title "ambiguous_present_past_2to1 (n = 24, full 0.38)" noenhanced
set xlabel 'layer band' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [4.5:-0.5]
set xtics ("1/3\nL0-9" 0, "2/3\nL10-19" 1, "3/3\nL20-29" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4)
set colorbox
set cblabel 'accuracy drop'
plot $p6 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p6 using 1:2:4 with labels notitle
unset multiplot
set terminal pdfcairo noenhanced size 15.20in,7.70in font 'sans,7'
set output pdf
set multiplot layout 2,4 title "smollm2-135m: accuracy drop when an edge group is ablated in a band of the layers (drop = full - ablated)" noenhanced
set title "copying (n = 24, full 0.96)" noenhanced
set xlabel 'layer band' offset 0,-0.8
set ylabel 'edge group'
set xrange [-0.5:2.5]
set yrange [4.5:-0.5]
set xtics ("1/3\nL0-9" 0, "2/3\nL10-19" 1, "3/3\nL20-29" 2)
set ytics ("x->y same" 0, "y->y earlier" 1, "y->last" 2, "x->last" 3, "query->last" 4)
unset colorbox
plot $p0 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p0 using 1:2:4 with labels notitle
set title "country_capital (n = 24, full 0.33)" noenhanced
set xlabel 'layer band' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [4.5:-0.5]
set xtics ("1/3\nL0-9" 0, "2/3\nL10-19" 1, "3/3\nL20-29" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4)
unset colorbox
plot $p1 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p1 using 1:2:4 with labels notitle
set title "present_past (n = 24, full 0.79)" noenhanced
set xlabel 'layer band' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [4.5:-0.5]
set xtics ("1/3\nL0-9" 0, "2/3\nL10-19" 1, "3/3\nL20-29" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4)
unset colorbox
plot $p2 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p2 using 1:2:4 with labels notitle
set title "person_sport (n = 24, full 0.29)" noenhanced
set xlabel 'layer band' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [4.5:-0.5]
set xtics ("1/3\nL0-9" 0, "2/3\nL10-19" 1, "3/3\nL20-29" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4)
unset colorbox
plot $p3 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p3 using 1:2:4 with labels notitle
set title "capitalization (n = 24, full 1.00)" noenhanced
set xlabel 'layer band' offset 0,-0.8
set ylabel 'edge group'
set xrange [-0.5:2.5]
set yrange [4.5:-0.5]
set xtics ("1/3\nL0-9" 0, "2/3\nL10-19" 1, "3/3\nL20-29" 2)
set ytics ("x->y same" 0, "y->y earlier" 1, "y->last" 2, "x->last" 3, "query->last" 4)
unset colorbox
plot $p4 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p4 using 1:2:4 with labels notitle
set title "ambiguous_present_past (n = 24, full 0.71)" noenhanced
set xlabel 'layer band' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [4.5:-0.5]
set xtics ("1/3\nL0-9" 0, "2/3\nL10-19" 1, "3/3\nL20-29" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4)
unset colorbox
plot $p5 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p5 using 1:2:4 with labels notitle
set title "ambiguous_present_past_2to1 (n = 24, full 0.38)" noenhanced
set xlabel 'layer band' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [4.5:-0.5]
set xtics ("1/3\nL0-9" 0, "2/3\nL10-19" 1, "3/3\nL20-29" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4)
set colorbox
set cblabel 'accuracy drop'
plot $p6 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p6 using 1:2:4 with labels notitle
unset multiplot
unset output
